"""Batched greedy decoding for lm-eval's `generate_until`, in two forms that give the same tokens:

- `kv_greedy`: our Transformer's KV cache through `llmtrain.model.sampling.decode` (prompts of
  different lengths left-padded in one batch, the padding masked, per-row positions), so a row
  decodes exactly as it would alone.
- `forward_greedy`: a full forward per new token through any `forward(ids) -> logits` (the training
  backend during in-loop evaluation, where ZeRO-3 owns the parameters and no cache exists); rows are
  right-padded, which causal attention never sees.

`stop(row, tokens)` says when a row is finished (EOS or a stop string, decided by the caller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StopFn = Callable[[int, list[int]], bool]


@torch.no_grad()
def kv_greedy(model, prompts: list[list[int]], max_new: int, stop: StopFn, pad_id: int) -> list[list[int]]:
    """Greedy continuations (at most max_new tokens each) of a batch of prompts, with one KV cache:
    `llmtrain generate`'s decoder at temperature 0."""
    from llmtrain.model.sampling import SamplingParams, decode

    return decode(model, prompts, max_new, SamplingParams(temperature=0.0), should_stop=stop, pad_id=pad_id)


@torch.no_grad()
def forward_greedy(
    forward: Callable[[torch.Tensor], torch.Tensor],
    prompts: list[list[int]],
    max_new: int,
    stop: StopFn,
    pad_id: int,
    *,
    device,
    vocab_size: int,
    agree: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuations by a full forward per token. `agree(finished)` (distributed) returns
    whether every rank is finished, so all ranks run the same number of forwards."""
    rows = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        lengths = torch.tensor([len(r) for r in rows], device=device)
        ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        logits = forward(ids)  # (B, T, V)
        last = logits[torch.arange(len(rows), device=device), lengths - 1, :vocab_size]  # (B, V)
        for i, token in enumerate(last.argmax(dim=-1).tolist()):
            if not done[i]:
                out[i].append(token)
                rows[i].append(token)
                done[i] = stop(i, out[i])
        finished = all(done)
        if agree is not None:
            finished = agree(finished)
        if finished:
            break
    return out
