"""A loader batch on the device, in the (inputs, targets, doc_ids) form the model takes.

Shared by the trainer and validation, so neither depends on the other.
"""

from __future__ import annotations

import torch


def batch_to_device(batch: dict, device: torch.device, doc_mask: bool):
    """(inputs, targets, doc_ids or None) of a loader batch (B, T+1), on `device`.

    The int32 tokens travel as they are (from pinned memory the copy does not block the host); the
    model widens the targets for the loss on the device.
    """
    tokens = batch["tokens"].to(device, non_blocking=True)
    doc_ids = batch["doc_ids"][:, :-1].to(device, non_blocking=True) if doc_mask else None
    return tokens[:, :-1], tokens[:, 1:], doc_ids
