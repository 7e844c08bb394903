"""Validation metrics (loss, perplexity, bits per byte, per source), shared by the trainer's periodic
validation and `llmtrain eval`."""

from __future__ import annotations

import math

import torch

from llmtrain.config import Config
from llmtrain.data.batch import batch_to_device


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
            sums[0] += loss.double() * targets.numel()
            sums[1] += targets.numel()
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
    """`llmtrain eval`: the validation splits of the checkpoint's own data config, whole by default."""
    import json

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
