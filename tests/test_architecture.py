"""The structure drawn in docs/architecture.md, checked: one boundary around DeepSpeed, imports that
point one way (down the layers), no cycles, and nothing that imports the CLI.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmtrain"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("llmtrain", "llmtrain.errors", "llmtrain.io", "llmtrain.faults", "llmtrain.train.stop")),
    ("section schemas", ("llmtrain.model.config", "llmtrain.data.config", "llmtrain.train.config")),
    ("root schema", ("llmtrain.config",)),
    (
        "components",
        (
            "llmtrain.model",
            "llmtrain.kernels",
            "llmtrain.data",
            "llmtrain.train.optim",
            "llmtrain.train.schedule",
        )
        + ("llmtrain.train.metrics", "llmtrain.train.manifest", "llmtrain.train.guard")
        + ("llmtrain.train.run_terms", "llmtrain.train.checkpoint", "llmtrain.train", "llmtrain.eval"),
    ),
    ("backend", ("llmtrain.distributed",)),
    (
        "commands",
        ("llmtrain.train.trainer", "llmtrain.train.universal", "llmtrain.inference", "llmtrain.eval.evaluate")
        + ("llmtrain.generate", "llmtrain.chat", "llmtrain.export", "llmtrain.plan"),
    ),
    ("entry points", ("llmtrain.app", "llmtrain.preflight", "llmtrain.cli", "llmtrain.__main__")),
]
ENTRY_ALIASES = {"llmtrain.train.__main__": "llmtrain.app"}  # placed with the entry points


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module` (a module listed itself wins over its package)."""
    module = ENTRY_ALIASES.get(module, module)
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer: place it in LAYERS (and docs/architecture.md)")
    return best


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, node.lineno))
    return found


def internal(name: str) -> str | None:
    """The llmtrain module an import refers to (its longest existing prefix), or None."""
    while name and name not in MODULES:
        if "." not in name:
            return "llmtrain.kernels" if name == "llmtrain.kernels" else None
        name = name.rsplit(".", 1)[0]
    return name or None


GRAPH = {
    module: sorted({d for name, _ in imports_of(path, module) if (d := internal(name)) and d != module})
    for module, path in MODULES.items()
}


def deepspeed_importers(modules: dict[str, Path]) -> list[str]:
    return [
        f"{path.name}:{line}"
        for module, path in modules.items()
        for name, line in imports_of(path, module)
        if (name == "deepspeed" or name.startswith("deepspeed."))
        and not module.startswith("llmtrain.distributed")
    ]


def upward_imports(graph: dict[str, list[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for module, deps in graph.items()
        for dep in deps
        if layer_of(dep) > layer_of(module)
    ]


def test_only_the_backend_imports_deepspeed():
    offenders = deepspeed_importers(MODULES)
    offenders += [
        str(path.relative_to(ROOT))
        for path in (ROOT / "kernels").glob("*.py")
        if "import deepspeed" in path.read_text() or "from deepspeed" in path.read_text()
    ]
    assert not offenders, f"deepspeed imported outside llmtrain/distributed: {offenders}"


def test_nothing_imports_the_cli():
    users = [m for m, deps in GRAPH.items() if "llmtrain.cli" in deps and m != "llmtrain.__main__"]
    assert not users, f"{users} import llmtrain.cli; share code through llmtrain.app instead"


def test_imports_point_down_the_layers():
    upward = upward_imports(GRAPH)
    assert not upward, "\n".join(upward)


def test_the_checks_flag_a_lazy_deepspeed_import_and_an_upward_one(tmp_path):
    """The rules can fail: an import inside a function of a trainer-side module is caught."""
    fake = tmp_path / "optim.py"
    fake.write_text("def build():\n    import deepspeed\n    from llmtrain.train import trainer\n")
    assert deepspeed_importers({"llmtrain.train.optim": fake}) == ["optim.py:2"]
    deps = [internal(name) for name, _ in imports_of(fake, "llmtrain.train.optim")]
    assert upward_imports({"llmtrain.train.optim": [d for d in deps if d]}) == [
        "llmtrain.train.optim (components) imports llmtrain.train.trainer (commands)"
    ]


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"
