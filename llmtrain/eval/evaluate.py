"""Validation metrics (loss, perplexity, bits per byte, per source), shared by the trainer's periodic
validation and `llmtrain eval`."""

from __future__ import annotations

import math

import torch

from llmtrain.config import Config
from llmtrain.data.batch import batch_to_device
from llmtrain.model.transformer import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, val_loader, device: torch.device, *, doc_mask: bool = False) -> dict[str, float]:
    """Token-weighted mean loss per source and overall, summed over every rank when distributed.

    `model(inputs, targets, doc_ids)` returns a mean loss; it may be the training backend. Every rank
    must call this (ZeRO-3 forwards are collective; the loader gives every rank the same count).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for name in val_loader.source_names:
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
        for batch in val_loader.batches(name):
            inputs, targets, doc_ids = batch_to_device(batch, device, doc_mask)
            loss = model(inputs, targets, doc_ids)
            scored = (targets != IGNORE_INDEX).sum()  # chat data: prompt positions are not scored
            sums[0] += loss.double() * scored
            sums[1] += scored
        if distributed:
            dist.all_reduce(sums)
        total += sums
        loss_sum, tokens = sums.tolist()
        if tokens == 0:
            continue
        metrics.update(_named(f"val/{name}/", loss_sum / tokens, val_loader.bytes_per_token(name)))
    model.train(was_training)
    loss_sum, tokens = total.tolist()
    if tokens:
        metrics["val_loss"] = loss_sum / tokens
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 700.0))
    return metrics


def _named(prefix: str, loss: float, bytes_per_token: float | None) -> dict[str, float]:
    out = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        # nats per token -> bits per token -> bits per UTF-8 byte of the original text
        out[f"{prefix}bpb"] = loss / math.log(2) / bytes_per_token
    return out


def main(cfg: Config) -> int:
    """`llmtrain eval`: the validation splits of the checkpoint's own data config, whole by default;
    with `eval.tasks=[...]`, those lm-evaluation-harness tasks instead (see `main_tasks`)."""
    import json

    if cfg.eval.tasks:
        return main_tasks(cfg)

    from llmtrain.data.loader import build_val_loader
    from llmtrain.inference import load_checkpoint_model

    loaded = load_checkpoint_model(cfg, cfg.eval.checkpoint)
    run_cfg = loaded.config
    run_cfg.train.micro_batch_size = cfg.eval.micro_batch_size
    run_cfg.train.val_batches = cfg.eval.max_batches
    device = next(loaded.model.parameters()).device
    metrics = evaluate(loaded.model, build_val_loader(run_cfg, 0, 1), device, doc_mask=run_cfg.model.doc_mask)
    metrics = {"checkpoint": str(loaded.checkpoint), "step": loaded.step, **metrics}
    print(json.dumps(metrics, indent=2))
    return 0


def main_tasks(cfg: Config) -> int:
    """lm-eval tasks on a checkpoint: the table on stdout, results + samples in
    `<run_dir>/eval/<step>/`, the worst examples when `eval.worst=K`, a wandb summary when enabled."""
    import sys

    from llmtrain.eval.tasks import flat_metrics, plan_tasks, run
    from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

    ev = cfg.eval
    # first: a missing lm-eval, an unknown task or a bad data line is named before the model loads
    plan = plan_tasks(list(ev.tasks), ev.include_path, registry=ev.registry)
    from llmtrain.eval.lm_adapter import LlmtrainLM
    from llmtrain.eval.report import format_worst, log_wandb, worst_examples, write_results

    loaded = load_checkpoint_model(cfg, ev.checkpoint)
    tokenizer = load_matching_tokenizer(loaded)
    lm = LlmtrainLM.from_model(
        loaded.model, tokenizer, batch_size=ev.batch_size or ev.micro_batch_size, max_gen_toks=ev.max_gen_toks
    )
    results = run(
        lm,
        plan,
        limit=ev.limit,
        num_fewshot=ev.num_fewshot,
        bootstrap_iters=ev.bootstrap_iters,
        log_samples=ev.log_samples or ev.worst > 0,
    )
    from lm_eval.utils import make_table

    results["config"]["model"] = "llmtrain"
    results["config"]["model_args"] = {"checkpoint": str(loaded.checkpoint)}
    print(f"llmtrain eval: checkpoint {loaded.checkpoint} (step {loaded.step})")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if ev.worst:
        print(format_worst(worst_examples(results, ev.worst)))
    if not ev.log_samples:
        results.pop("samples", None)
    run_dir = _run_dir_of(loaded.checkpoint, cfg)
    out = write_results(results, run_dir / "eval" / str(loaded.step))
    print(f"llmtrain eval: wrote {out}", file=sys.stderr)
    log_wandb(cfg, flat_metrics(results), step=loaded.step, run_dir=run_dir)
    return 0


def _run_dir_of(checkpoint, cfg: Config):
    """The run that owns the checkpoint (`<run>/checkpoints/step_N`), else the configured run."""
    from pathlib import Path

    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else cfg.run_dir


def register_lm_eval_model() -> None:
    """Register `llmtrain` in lm-eval's model registry, for `simple_evaluate(model="llmtrain",
    model_args="checkpoint=<folder>")` from Python: a verified checkpoint, on the GPU when there is one."""
    from llmtrain.eval.tasks import require_lm_eval

    require_lm_eval()
    from lm_eval.api.registry import register_model

    from llmtrain.eval.lm_adapter import LlmtrainLM
    from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

    class CheckpointLM(LlmtrainLM):
        """`checkpoint=<folder>` (or `run_dir=<run>` for its newest verified checkpoint)."""

        def __init__(self, checkpoint=None, run_dir=None, batch_size=8, max_gen_toks=256, device=None, **_):
            import torch

            cfg = Config()
            cfg.run.dir = run_dir
            loaded = load_checkpoint_model(cfg, checkpoint, device=torch.device(device) if device else None)
            model = loaded.model
            super().__init__(
                model,
                load_matching_tokenizer(loaded),
                max_length=model.cfg.max_seq_len,
                vocab_size=model.vocab_size,
                device=model.tok_emb.weight.device,
                batch_size=int(batch_size or 8),
                max_gen_toks=int(max_gen_toks),
                kv_model=model,
            )

    from lm_eval.api.registry import model_registry

    if "llmtrain" not in model_registry:
        register_model("llmtrain")(CheckpointLM)
