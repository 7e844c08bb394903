"""`llmtrain generate`: sample text from a checkpoint with the KV-cache decoding path."""

from __future__ import annotations

import torch

from llmtrain.config import Config
from llmtrain.errors import UserError
from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompt` (the prompt included), one per sample."""
    device = next(model.parameters()).device
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)] if tokenizer.bos_id >= 0 else tokenizer.encode(prompt)
    room = model.cfg.max_seq_len - len(ids)
    if room <= 0:
        raise UserError(
            f"generate.prompt: {len(ids)} tokens leave no room in model.max_seq_len={model.cfg.max_seq_len}"
        )
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        prompt_ids,
        min(max_new_tokens, room),
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    texts = []
    for row in out.tolist():
        if tokenizer.eos_id in row[len(ids) :]:
            row = row[: row.index(tokenizer.eos_id, len(ids))]
        texts.append(tokenizer.decode(row))
    return texts


def main(cfg: Config) -> int:
    g = cfg.generate
    loaded = load_checkpoint_model(cfg, g.checkpoint)
    tokenizer = load_matching_tokenizer(loaded)
    texts = generate_text(
        loaded.model,
        tokenizer,
        g.prompt,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_k=g.top_k,
        num_samples=g.num_samples,
        seed=cfg.run.seed,
    )
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} of {len(texts)} (checkpoint {loaded.checkpoint.name}) ---")
        print(text)
    return 0
