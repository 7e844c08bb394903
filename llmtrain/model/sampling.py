"""Sampling controls and the batched decoding loop behind `Transformer.generate`, `llmtrain generate`
and `llmtrain chat`.

Two properties are kept on purpose, and tested:
- A row's tokens do not depend on the batch it is decoded in. Prompts of different lengths are
  left-padded; each row gets its own positions (counted from its first real token) and an attention
  mask that hides its padding, and each row can draw its random numbers from its own generator.
- The KV cache changes nothing: `use_cache=False` recomputes the whole prefix every step through the
  same code, so greedy and seeded sampling give the same tokens either way.

Sampling draws one uniform number per row and inverts the cumulative distribution over the
vocabulary in its natural order: top-k and top-p only zero some probabilities, so `top_k=0` and
`top_p=1` give exactly plain softmax sampling with the same draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Rng = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; <= 0 means greedy (argmax)."""
    top_k: int | None = None
    """Keep the k most likely tokens; None or 0 keeps all."""
    top_p: float | None = None
    """Keep the smallest set of most likely tokens whose probability reaches p; None or 1 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the prompt or the output: a positive logit is divided by
    it, a negative one multiplied; 1 is off."""

    def __post_init__(self):
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool: CTRL's repetition penalty on the seen tokens."""
    if seen is None or penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V), fp32, after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    V = logits.shape[-1]
    if params.top_k and params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= params.top_p  # the most likely token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def uniforms(rng: Rng, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) uniform draws in [0, 1): from one generator for the batch, or one per row."""
    if rng is None or isinstance(rng, torch.Generator):
        gen_device = rng.device if rng is not None else device
        return torch.rand(batch, generator=rng, device=gen_device).to(device)
    if len(rng) != batch:
        raise ValueError(f"{len(rng)} generators for {batch} rows")
    # one host-to-device copy for the batch, not one per row
    return torch.tensor([float(torch.rand((), generator=g, device=g.device)) for g in rng], device=device)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (B, V) (need not sum to 1), u (B,) in [0, 1) -> ids (B,)."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]  # (B, 1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first token whose cdf passes it
    return ids.clamp_(max=probs.shape[-1] - 1)


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, rng: Rng = None, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (B, V) of the real vocabulary -> the next token of every row (B,)."""
    logits = penalize(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    return draw(filtered_probs(logits, params), uniforms(rng, logits.shape[0], logits.device))


# ----------------------------------------------------------------------------------------------
# The decoding loop.


def _forward_rows(
    model,
    chunk: torch.Tensor,
    start: int,
    offset: torch.Tensor | None,
    valid: torch.Tensor,
    cache,
) -> torch.Tensor:
    """Run the columns start .. start+T of a left-padded batch (B, T); logits of the last one (B, V).

    `offset` (B,) is each row's padding (None: no row is padded), `valid` (B, start+T) marks real
    tokens. Without a cache `start` is 0 and the whole prefix is recomputed.
    """
    T = chunk.shape[1]
    S = start + T
    cols = torch.arange(start, S, device=chunk.device)  # (T,)
    if offset is None:
        positions, mask = cols, None  # plain causal (prefill) or one query against every cached key
        if cache is not None and start > 0 and T > 1:
            mask = torch.arange(S, device=chunk.device)[None, :] <= cols[:, None]  # (T, S)
    else:
        # (B, T): each row counts its positions from its first real token
        positions = (cols[None, :] - offset[:, None]).clamp(min=0)
        keys = torch.arange(S, device=chunk.device)
        causal = keys[None, :] <= cols[:, None]  # (T, S)
        mask = causal[None] & valid[:, None, :S]  # (B, T, S): never attend to padding
        mask = mask | (keys[None, :] == cols[:, None])[None]  # a padding query sees itself: no empty row
        mask = mask[:, None]  # (B, 1, T, S), broadcast over heads
    return model.decode_step(chunk, cache, positions, mask, last_only=True)  # (B, V)


@torch.no_grad()
def decode(
    model,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    params: SamplingParams,
    *,
    rng: Rng = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens of every prompt (a stop id, when emitted, is the last one).

    `prompts` is a (B, T0) tensor or B id lists of any lengths; `max_new_tokens` one limit or one per
    row (the caller keeps prompt + limit within the model's context). `on_token(row, id)` sees each
    token as it is chosen; `should_stop(row, tokens)` ends a row early (a stop string).
    The model must be in eval mode.
    """
    device = model.tok_emb.weight.device
    if isinstance(prompts, torch.Tensor):
        rows = [list(range(prompts.shape[1]))] * prompts.shape[0]  # lengths only; ids copied below
        dtype = prompts.dtype  # float ids fail in the embedding, as they should
    else:
        rows, dtype = [list(p) for p in prompts], torch.long
    B = len(rows)
    lengths = [len(r) for r in rows]
    if B == 0:
        return []
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    steps = max(limits)
    if steps <= 0:
        return [[] for _ in range(B)]
    L = max(lengths)
    total = L + steps
    ids = torch.full((B, total), pad_id, dtype=dtype, device=device)
    valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    if isinstance(prompts, torch.Tensor):
        ids[:, :L] = prompts.to(device)
        valid[:, :L] = True
    else:
        for i, row in enumerate(rows):
            ids[i, L - len(row) : L] = torch.tensor(row, dtype=dtype)
            valid[i, L - len(row) : L] = True
    padded = any(n != L for n in lengths)
    offset = torch.tensor([L - n for n in lengths], device=device) if padded else None
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.vocab_size), dtype=torch.bool, device=device)
        for i in range(B):  # row by row: a scatter with the padding's False could overwrite a True
            seen[i, ids[i, L - lengths[i] : L].long()] = True
    cache = model.new_cache(B, total) if use_cache else None
    stops = set(int(s) for s in stop_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [limit <= 0 for limit in limits]
    cur = L
    logits = _forward_rows(model, ids[:, :cur], 0, offset, valid, cache)  # prefill
    for _ in range(steps):
        token = next_tokens(logits, params, rng, seen)  # (B,)
        ids[:, cur] = token.to(dtype)
        valid[:, cur] = torch.tensor([not d for d in done], device=device)
        cur += 1
        for i, t in enumerate(token.tolist()):  # the one host sync of a step
            if done[i]:
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t in stops or len(out[i]) >= limits[i] or (should_stop is not None and should_stop(i, out[i])):
                done[i] = True
        if all(done):
            break
        if seen is not None:
            seen.scatter_(1, token[:, None].long(), True)
        if cache is not None:
            logits = _forward_rows(model, ids[:, cur - 1 : cur], cur - 1, offset, valid, cache)
        else:
            logits = _forward_rows(model, ids[:, :cur], 0, offset, valid, None)
    return out
