"""`llmtrain export`: a checkpoint as a Hugging Face model folder (config.json, model.safetensors and
the sentencepiece tokenizer), loadable with `transformers.AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmtrain.config import Config
from llmtrain.errors import UserError
from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

MARKER = "llmtrain.json"
"""Written into every export; only a folder holding it may be replaced by a new export."""


def export_hf(cfg: Config, out: str | Path | None = None, checkpoint: str | None = None) -> Path:
    from safetensors.torch import save_file

    from llmtrain.model.hf import to_hf

    out = Path(out or cfg.run_dir / "hf")
    if out.exists() and not (out / MARKER).is_file():
        # It is replaced whole below: never delete a folder we did not write.
        raise UserError(f"export.out={out}: exists and is not an llmtrain export; choose a new folder")
    loaded = load_checkpoint_model(cfg, checkpoint, device=None)
    tokenizer = load_matching_tokenizer(loaded)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    state = {name: t.detach().cpu() for name, t in loaded.model.state_dict().items()}
    hf_state, hf_config = to_hf(state, loaded.config.model)
    hf_config.update(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else None,
    )
    save_file(
        {k: v.contiguous() for k, v in hf_state.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(tokenizer, tmp)
    (tmp / MARKER).write_text(
        json.dumps(
            {"checkpoint": str(loaded.checkpoint), "step": loaded.step, "tokenizer_hash": tokenizer.hash},
            indent=2,
        )
        + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears under its final name only when complete
    return out


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """The sentencepiece model as HF's LlamaTokenizer reads it (tokenizer.model + tokenizer_config.json)."""
    shutil.copyfile(tokenizer.path, folder / "tokenizer.model")

    def piece(i: int) -> str | None:
        return tokenizer.id_to_piece(i) if i >= 0 else None

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.unk_id),
        "pad_token": piece(tokenizer.pad_id),
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,  # our pieces have no dummy "▁" prefix; HF's default would add one
        "legacy": False,
        "model_max_length": 1_000_000,
    }
    config.update(_chat_template_entries(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _chat_template_entries(tokenizer) -> dict:
    """The chat template and its tokens, for a tokenizer that has them: `apply_chat_template` then
    renders, id for id, what `llmtrain.data.chat_template.render_conversation` trained on."""
    from llmtrain.data.chat_template import CHAT_TOKENS, JINJA_TEMPLATE, chat_token_ids
    from llmtrain.errors import DataError

    try:
        chat_token_ids(tokenizer)
    except DataError:
        return {}  # pretrained without the chat tokens: nothing to template
    return {"chat_template": JINJA_TEMPLATE, "additional_special_tokens": list(CHAT_TOKENS)}


def main(cfg: Config) -> int:
    out = export_hf(cfg, cfg.export.out, cfg.export.checkpoint)
    print(f"exported to {out} (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0
