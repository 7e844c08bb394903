"""What `llmtrain eval eval.tasks=[...]` leaves behind: lm-eval's results and samples, the worst
examples, and a wandb summary.

`<run_dir>/eval/<step>/results.json` is lm-eval's own results dict (what its `--output_path` writes,
without the samples), and `samples_<task>.jsonl` one logged example per line (lm-eval's
`log_samples` records: doc, target, arguments, responses, per-example metrics). The folder is
written whole under a temporary name and renamed, so it is never half-written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError

RESULTS = "results.json"


def _dumps(obj: Any, **kwargs) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False, **kwargs)


def write_results(results: dict, folder: Path) -> Path:
    """results.json and samples_<task>.jsonl in `folder` (replaced whole if it is an earlier eval)."""
    folder = Path(folder)
    if folder.exists() and not (folder / RESULTS).is_file():
        raise UserError(f"{folder}: exists and is not an llmtrain eval folder; not replacing it")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    summary = {k: v for k, v in results.items() if k != "samples"}
    (tmp / RESULTS).write_text(_dumps(summary, indent=2) + "\n", encoding="utf-8")
    for task, samples in (results.get("samples") or {}).items():
        lines = "".join(_dumps(s) + "\n" for s in samples)
        (tmp / f"samples_{task}.jsonl").write_text(lines, encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------- error analysis


@dataclass
class Example:
    task: str
    doc_id: int
    score: float
    """Lower is worse: the right answer's log-likelihood, or the example's F1 / BLEU / exact match."""
    measure: str
    prompt: str
    expected: str
    produced: str


def score_example(sample: dict, output_type: str) -> tuple[float, str, str, str] | None:
    """(score, measure, expected, produced) of one lm-eval sample record; None if it has no score."""
    args = sample.get("arguments") or []
    resps = sample.get("filtered_resps") or []
    if output_type == "multiple_choice":
        gold = sample.get("target")
        lls = [float(r[0]) for r in resps]
        if not isinstance(gold, int) or not 0 <= gold < len(lls):
            return None
        best = max(range(len(lls)), key=lls.__getitem__)
        return lls[gold], "log-likelihood of the right answer", args[gold][1], args[best][1]
    if output_type == "loglikelihood":
        return float(resps[0][0]), "log-likelihood of the right answer", args[0][1], ""
    if output_type == "generate_until":
        produced = resps[0] if resps else ""
        expected = str(sample.get("target"))
        for metric in ("f1", "bleu", "exact_match"):
            if metric in sample:
                value = sample[metric]
                if metric == "bleu":  # lm-eval keeps (reference, prediction) for its corpus BLEU
                    import sacrebleu

                    value = sacrebleu.sentence_bleu(str(produced), [expected]).score
                return float(value), metric, expected, str(produced)
        numbers = [k for k in sample.get("metrics", []) if isinstance(sample.get(k), int | float)]
        if numbers:
            return float(sample[numbers[0]]), numbers[0], expected, str(produced)
    return None


def worst_examples(results: dict, k: int) -> dict[str, list[Example]]:
    """The k lowest-scoring examples of each task (ties by doc id), from lm-eval's logged samples."""
    out: dict[str, list[Example]] = {}
    configs = results.get("configs") or {}
    for task, samples in (results.get("samples") or {}).items():
        output_type = (configs.get(task) or {}).get("output_type", "")
        scored = []
        for sample in samples:
            got = score_example(sample, output_type)
            if got is None:
                continue
            score, measure, expected, produced = got
            prompt = (sample.get("arguments") or [[""]])[0][0]
            scored.append(Example(task, int(sample["doc_id"]), score, measure, prompt, expected, produced))
        scored.sort(key=lambda e: (e.score, e.doc_id))
        out[task] = scored[:k]
    return out


def format_worst(worst: dict[str, list[Example]]) -> str:
    lines = []
    for task, examples in worst.items():
        if not examples:
            continue
        lines.append(f"worst {len(examples)} of {task} (lowest {examples[0].measure}):")
        for rank, ex in enumerate(examples, start=1):
            lines.append(f"#{rank} doc {ex.doc_id}  score {ex.score:.4g}")
            lines.append(f"  prompt:   {_one_line(ex.prompt)}")
            lines.append(f"  expected: {_one_line(ex.expected)}")
            lines.append(f"  produced: {_one_line(ex.produced)}")
    return "\n".join(lines)


def _one_line(text: str, width: int = 200) -> str:
    text = repr(str(text))[1:-1]  # newlines visible as \n
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------------------- wandb


def log_wandb(cfg, summary: dict[str, float], *, step: int, run_dir: Path) -> None:
    """The summary as one wandb run of job type `eval`, grouped with the training run."""
    w = cfg.logging.wandb
    if w.mode == "disabled":
        return
    try:
        import wandb
    except ImportError:
        raise UserError(
            f"logging.wandb.mode={w.mode} needs the wandb package (pip install wandb), "
            "or set logging.wandb.mode=disabled"
        ) from None
    run = wandb.init(
        project=w.project,
        entity=w.entity,
        name=f"{w.name or cfg.run.name}-eval-step{step}",
        group=cfg.run.name,
        job_type="eval",
        tags=list(w.tags) or None,
        dir=str(run_dir),
        mode=w.mode,
        config={"checkpoint_step": step, "tasks": list(cfg.eval.tasks)},
    )
    run.log({**summary, "checkpoint_step": step})
    run.summary.update(summary)
    run.finish()
