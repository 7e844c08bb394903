"""The data report of `llmtrain prepare`: `<data.dir>/report.json`, a printed table and `report.png`.

Per source: documents and characters in, documents removed by each clean stage, documents and tokens
out. For the mixture: each source's share of the sampled tokens (its weight share), its share of the
corpus, and the epochs it is expected to run over `train.max_steps`: a source weighted to 75% that
holds 2% of the tokens is repeated many times, which is worth seeing before training, not after.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from llmtrain.data.clean import source_clean_settings
from llmtrain.data.clean_state import load_result
from llmtrain.io import write_atomic

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def build_report(cfg, results) -> dict:
    """The report as a JSON-ready dict, from the prepare results (SourceResult per source)."""
    sources: dict[str, dict] = {}
    for r in results:
        src = next(s for s in cfg.data.sources if s.name == r.name)
        # a clean folder left from before cleaning was turned off for this source does not count
        clean = load_result(cfg.data_dir, r.name) if source_clean_settings(cfg, src) is not None else None
        docs_out = sum(r.docs.values())
        sources[r.name] = {
            "cleaned": clean is not None,
            "docs_in": clean.docs_in if clean else docs_out,
            "chars_in": clean.chars_in if clean else None,
            "removed": dict(clean.removed) if clean else {},
            "removed_reasons": dict(clean.reasons) if clean else {},
            "docs_out": docs_out,
            "chars_out": clean.chars_out if clean else None,
            "tokens_out": sum(r.tokens.values()),
            "train_tokens": r.tokens["train"],
            "val_tokens": r.tokens["val"],
            "skipped_records": r.skipped_records,
        }
    return {"sources": sources, "mixture": mixture(cfg, sources), "run": run_terms(cfg)}


def run_terms(cfg) -> dict:
    glob = cfg.train.global_batch_size
    seq = cfg.train.seq_len
    return {
        "max_steps": cfg.train.max_steps,
        "global_batch_size": glob,
        "seq_len": seq,
        "tokens": cfg.train.max_steps * glob * seq if glob else None,
    }


def mixture(cfg, sources: dict[str, dict]) -> dict[str, dict]:
    """Weight share, corpus share and expected epochs of each source.

    The loader gives each source exactly its weight share of the samples; a source of N training tokens
    has (N - 1) // seq_len windows, and one epoch visits each once. Epochs need the global batch size
    (`train.global_batch_size`); without it they are null.
    """
    weights = {s.name: s.weight for s in cfg.data.sources if s.name in sources}
    total_weight = sum(weights.values())
    total_tokens = sum(sources[n]["train_tokens"] for n in weights) or 1
    run = run_terms(cfg)
    out = {}
    for name, weight in weights.items():
        share = weight / total_weight
        windows = max(sources[name]["train_tokens"] - 1, 0) // run["seq_len"]
        samples = share * cfg.train.max_steps * run["global_batch_size"] if run["global_batch_size"] else None
        out[name] = {
            "weight": weight,
            "share": round(share, 6),
            "corpus_share": round(sources[name]["train_tokens"] / total_tokens, 6),
            "sampled_tokens": round(samples * run["seq_len"]) if samples is not None else None,
            "epochs": round(samples / windows, 4) if samples is not None and windows else None,
        }
    return out


def table(report: dict) -> str:
    """The report as a fixed-width text table, one row per source."""
    sources, mix = report["sources"], report["mixture"]
    stages = sorted({k for s in sources.values() for k in s["removed"]}, key=_stage_order)
    head = [
        "source",
        "docs in",
        *[_short(k) for k in stages],
        "docs out",
        "tokens out",
        "share",
        "corpus",
        "epochs",
    ]
    rows = []
    for name, s in sources.items():
        m = mix.get(name, {})
        epochs = m.get("epochs")
        rows.append(
            [
                name,
                f"{s['docs_in']:,}",
                *[f"{s['removed'].get(k, 0):,}" for k in stages],
                f"{s['docs_out']:,}",
                f"{s['tokens_out']:,}",
                f"{m.get('share', 0):.1%}",
                f"{m.get('corpus_share', 0):.1%}",
                "?" if epochs is None else f"{epochs:.2f}",
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_ORDER = ("length", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb", "decontaminate")


def _stage_order(key: str) -> tuple[int, str]:
    base = key.split(":", 1)[0]
    if base in _ORDER:
        return (_ORDER.index(base), key)
    return (len(_ORDER) + (0 if base == "exact_dedup" else 1), key)


def _short(key: str) -> str:
    return key.replace("decontaminate:", "decont:").replace("_dedup", " dup")


def plot(report: dict) -> bytes:
    """report.png: per source, documents kept and removed by stage; beside it, weight vs corpus share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources, mix = report["sources"], report["mixture"]
    names = list(sources)
    stages = sorted({k for s in sources.values() for k in s["removed"]}, key=_stage_order)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 2 + 0.5 * len(names)), constrained_layout=True)
    totals = [max(sources[n]["docs_in"], 1) for n in names]
    kept = [sources[n]["docs_out"] / t for n, t in zip(names, totals)]
    left.barh(names, kept, color="#2e7d32", label="kept")
    base = list(kept)
    colors = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (4, 5)]  # no greens
    for i, stage in enumerate(stages):
        values = [sources[n]["removed"].get(stage, 0) / t for n, t in zip(names, totals)]
        left.barh(names, values, left=base, color=colors[i % len(colors)], label=_short(stage))
        base = [b + v for b, v in zip(base, values)]
    left.set_xlim(0, 1)
    left.set_xlabel("share of the documents read")
    left.set_title("kept, and removed by each stage")
    left.invert_yaxis()
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    y = range(len(names))
    right.barh([i - 0.2 for i in y], [mix[n]["share"] for n in names], height=0.4, label="sampled (weight)")
    right.barh(
        [i + 0.2 for i in y], [mix[n]["corpus_share"] for n in names], height=0.4, label="corpus tokens"
    )
    right.set_yticks(list(y), names)
    right.invert_yaxis()
    right.set_xlabel("share")
    right.set_title("mixture: sampled share vs share of tokens")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(cfg, results) -> dict:
    """Write report.json and report.png into the data folder and print the table."""
    report = build_report(cfg, results)
    data_dir = Path(cfg.data_dir)
    text = json.dumps(report, indent=2) + "\n"
    old = data_dir / REPORT_JSON
    if not (old.is_file() and old.read_text() == text and (data_dir / REPORT_PNG).is_file()):
        write_atomic(data_dir / REPORT_PNG, plot(report))  # a rerun that changes nothing writes nothing
        write_atomic(old, text)
    print(f"data report ({data_dir / REPORT_JSON}, {REPORT_PNG}):\n{table(report)}", flush=True)
    return report
