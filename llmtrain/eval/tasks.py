"""Finding and running lm-evaluation-harness tasks, offline.

Tasks come from our shipped `configs/eval/` (always searched), the user's `eval.include_path`, and,
for names found in neither, lm-eval's own registry (a scan of ~15k YAMLs that takes seconds, so it
is done only when needed; `eval.registry=false` skips it). Nothing reaches the network: the Hugging
Face offline switches are set before lm-eval (and `datasets`) load, so a registry task whose data is
not already cached fails with datasets' own offline message.

A task YAML over local files (`dataset_path: json` with `dataset_kwargs.data_files`) may name them
relative to the YAML: they are resolved here (lm-eval would resolve them against the working
directory) and every JSONL line is checked first, so a malformed line is named by file and line.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.config import CONFIG_DIR
from llmtrain.errors import ConfigError, DataError, UserError

SHIPPED_TASKS = CONFIG_DIR / "eval"
LOCAL_FORMATS = ("json", "csv", "parquet", "text", "arrow")
EXTRA_HINT = "pip install -e .[eval]"


def require_lm_eval():
    """lm_eval, with the Hugging Face libraries switched offline first; a clear line when missing."""
    offline()
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"eval.tasks needs lm-evaluation-harness, which is not installed ({err.name}): {EXTRA_HINT}"
        ) from None
    logging.getLogger("lm_eval").setLevel(
        logging.WARNING if not os.environ.get("LLMTRAIN_DEBUG") else logging.INFO
    )
    return lm_eval


def offline() -> None:
    """Never download: task data and metrics must already be here."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # imported before us (e.g. by transformers): its constant is already read
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True


@dataclass
class TaskPlan:
    """What `run` hands lm-eval: a task manager that knows every name, and one spec per task."""

    manager: Any
    specs: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    key: str = "eval.tasks"
    """The config key the names came from, for messages."""


def plan_tasks(names: list[str], include_path: str | None, *, registry: bool = True, key: str = "eval.tasks"):
    """Resolve task names (or YAML paths) to lm-eval specs; unknown names and bad data fail here,
    before any model is loaded. `key` names the config key in messages."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not names:
        raise ConfigError(f"{key}: no task given")
    paths = [SHIPPED_TASKS]
    if include_path:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"eval.include_path={include_path}: no such folder")
        paths.append(folder.resolve())
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    missing = _missing(manager, names)
    if missing and registry:
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
        missing = _missing(manager, names)
    if missing:
        name = missing[0]
        close = difflib.get_close_matches(name, manager.all_tasks, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        where = "configs/eval" + (f", {include_path}" if include_path else "")
        where += (
            ", lm-eval's registry" if registry else " (lm-eval's registry not searched: eval.registry=false)"
        )
        raise ConfigError(f"{key}: unknown task {name!r} (searched {where}){hint}")
    plan = TaskPlan(manager=manager, names=list(names), key=key)
    for name in names:
        plan.specs.append(_spec(manager, name))
    return plan


def _missing(manager, names: list[str]) -> list[str]:
    return [n for n in names if n not in manager.task_index]


def _spec(manager, name: str):
    """The name itself, or, for a YAML over local files, its config with the files' absolute paths."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    yaml_path = entry.yaml_path
    if yaml_path is None or entry.kind.name != "TASK":
        return name  # a group, a tag or a Python task: lm-eval's own business
    try:
        raw = load_yaml(yaml_path, resolve_func=True)  # `!function`s are imported relative to the YAML
    except (OSError, ValueError, ImportError, AttributeError) as err:
        raise ConfigError(f"{yaml_path}: unreadable task YAML ({type(err).__name__}: {err})") from None
    if raw.get("dataset_path") not in LOCAL_FORMATS:
        return name
    kwargs = dict(raw.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        raise ConfigError(f"{yaml_path}: dataset_path {raw['dataset_path']} needs dataset_kwargs.data_files")
    kwargs["data_files"] = _resolve_files(files, yaml_path)
    if raw["dataset_path"] == "json":
        for path in _flat(kwargs["data_files"]):
            check_jsonl(Path(path))
    # lm-eval takes a dict spec as a whole inline config (not as overrides of the indexed one)
    return {**raw, "task": name, "dataset_kwargs": kwargs}


def _resolve_files(files, yaml_path: Path):
    if isinstance(files, dict):
        return {split: _resolve_files(f, yaml_path) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_files(f, yaml_path) for f in files]
    path = Path(str(files)).expanduser()
    path = path if path.is_absolute() else yaml_path.parent / path
    if not path.is_file():
        raise DataError(f"{yaml_path}: dataset_kwargs.data_files {files}: no such file ({path})")
    return str(path.resolve())


def _flat(files) -> list[str]:
    if isinstance(files, dict):
        return [p for f in files.values() for p in _flat(f)]
    if isinstance(files, list):
        return [p for f in files for p in _flat(f)]
    return [files]


def check_jsonl(path: Path) -> None:
    """Every non-blank line a JSON object with the first line's keys; the first bad one is named."""
    keys = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a JSON object per line expected, got {type(record).__name__}")
        if keys is None:
            keys, first = set(record), number
        elif set(record) != keys:
            diff = sorted(keys ^ set(record))
            raise DataError(f"{path}:{number}: fields differ from line {first}'s ({', '.join(diff)})")
    if keys is None:
        raise DataError(f"{path}: no records")


def run(
    lm, plan: TaskPlan, *, limit=None, num_fewshot=None, bootstrap_iters=100000, log_samples=True, seed=True
):
    """lm-eval's `simple_evaluate` on our LM; its results dict (None on ranks other than 0).

    `seed=False` leaves the global random generators alone (in-loop evaluation during training)."""
    from lm_eval import simple_evaluate

    seeds = {} if seed else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    try:
        return simple_evaluate(
            model=lm,
            tasks=list(plan.specs),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=plan.manager,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            **seeds,
        )
    except ConnectionError as err:  # datasets, offline, without the data in its cache
        raise DataError(
            f"{plan.key}: {err}: llmtrain never downloads; fetch the dataset into the Hugging Face cache "
            "(HF_HOME) on a machine with network first, or use a local task (docs/evaluation.md)"
        ) from None
    except Exception as err:
        import jinja2

        if isinstance(err, jinja2.exceptions.UndefinedError):
            raise DataError(f"{plan.key}: a prompt template names a missing field ({err})") from None
        raise


def flat_metrics(results: dict, prefix: str = "eval/") -> dict[str, float]:
    """{"eval/<task>/<metric>": value} of lm-eval's results; `acc,none` -> `acc`, other filters as
    `<metric>/<filter>`; stderr kept as `<metric>_stderr`; non-numbers (N/A) dropped."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric}/{filt}"
                out[f"{prefix}{task}/{name}"] = float(value)
    return out
