"""A loader batch on the device, in the (inputs, targets, doc_ids) form the model takes.

Shared by the trainer and validation, so neither depends on the other.
"""

from __future__ import annotations

import torch

from llmtrain.model.transformer import IGNORE_INDEX


def batch_to_device(batch: dict, device: torch.device, doc_mask: bool):
    """(inputs, targets, doc_ids or None) of a loader batch (B, T+1), on `device`.

    The int32 tokens travel as they are (from pinned memory the copy does not block the host); the
    model widens the targets for the loss on the device. A batch of chat data carries a loss mask:
    targets that are not trained on (prompt, headers) become IGNORE_INDEX, so they add nothing to
    the loss nor to the gradient.
    """
    tokens = batch["tokens"].to(device, non_blocking=True)
    doc_ids = batch["doc_ids"][:, :-1].to(device, non_blocking=True) if doc_mask else None
    targets = tokens[:, 1:]
    if "loss_mask" in batch:
        trained = batch["loss_mask"][:, 1:].to(device, non_blocking=True).bool()
        targets = targets.masked_fill(~trained, IGNORE_INDEX)
    return tokens[:, :-1], targets, doc_ids
