"""Batched greedy decoding for lm-eval's `generate_until`, in two forms that give the same tokens:

- `kv_greedy`: our Transformer's KV cache, prompts of different lengths left-padded in one batch; the
  padding is masked and each row's positions start at its first real token, so a row decodes exactly
  as it would alone.
- `forward_greedy`: a full forward per new token through any `forward(ids) -> logits` (the training
  backend during in-loop evaluation, where ZeRO-3 owns the parameters and no cache exists); rows are
  right-padded, which causal attention never sees.

`stop(row, tokens)` says when a row is finished (EOS or a stop string, decided by the caller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StopFn = Callable[[int, list[int]], bool]


def _pad_left(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)  # (B,)
    return ids, pads


def _mask(start: int, T: int, pads: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, T, S) bool for queries start..start+T-1 over keys 0..start+T-1: causal, padding hidden.

    A padding query sees only itself, so no softmax row is empty (an empty row is NaN, and NaN values
    would leak into real rows through the zero weights of masked keys)."""
    if not bool((pads > 0).any()):
        return None  # plain causal, the fast path
    device = pads.device
    queries = torch.arange(start, start + T, device=device)  # (T,)
    keys = torch.arange(start + T, device=device)  # (S,)
    causal = keys[None, :] <= queries[:, None]  # (T, S)
    real_key = keys[None, :] >= pads[:, None]  # (B, S)
    itself = keys[None, :] == queries[:, None]  # (T, S)
    return ((causal[None] & real_key[:, None]) | itself[None])[:, None]  # (B, 1, T, S)


def _step(model, ids: torch.Tensor, positions: torch.Tensor, mask, cache) -> torch.Tensor:
    """Our Transformer's decode step with per-row positions and an explicit mask; logits (B, T, V)."""
    x = model._embed(ids, positions)
    rope = model._rope(positions)
    for layer, block in enumerate(model.blocks):
        x = block(x, rope, mask, cache, layer)
    cache.length += ids.shape[1]
    return model.lm_head(model.norm_f(x))[..., : model.vocab_size]


@torch.no_grad()
def kv_greedy(model, prompts: list[list[int]], max_new: int, stop: StopFn, pad_id: int) -> list[list[int]]:
    """Greedy continuations (at most max_new tokens each) of a batch of prompts, with one KV cache."""
    from llmtrain.model.transformer import KVCache

    device = model.tok_emb.weight.device
    ids, pads = _pad_left(prompts, pad_id, device)
    B, width = ids.shape
    cache = KVCache(model.cfg, B, width + max_new, device, model.tok_emb.weight.dtype)
    positions = (torch.arange(width, device=device)[None, :] - pads[:, None]).clamp(min=0)  # (B, T)
    logits = _step(model, ids, positions, _mask(0, width, pads), cache)[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    for step in range(max_new):
        tokens = logits.argmax(dim=-1)  # (B,)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = stop(row, out[row])
        if all(done) or step == max_new - 1:
            break
        positions = (width + step - pads)[:, None]  # (B, 1)
        logits = _step(model, tokens[:, None], positions, _mask(width + step, 1, pads), cache)[:, -1]
    return out


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
