"""State-dict conversion to and from Hugging Face transformers' LlamaForCausalLM and GPT2LMHeadModel.

Pure tensor bookkeeping: transformers is not imported here (the export command and the tests do).

Conventions worth knowing:
- Rotary pairs: our rotary embedding rotates (x_i, x_{i+Q/2}) like HF's `rotate_half`, so q/k
  weights copy across unpermuted. (Meta's original Llama checkpoints pair (x_{2i}, x_{2i+1}) and
  need the q/k row permutation that HF's own conversion script applies; we never read those.)
- Our attention keeps q, k, v in one `qkv` matrix: rows [q (H*Q); k (K*Q); v (K*Q)], heads in order.
- GPT-2 stores Linear weights in `Conv1D` as (in, out): transposed relative to ours.
- Our embedding and output rows are padded to a multiple of cfg.vocab_multiple; HF's are not.
- Dropout is a training choice, not part of a checkpoint: from_hf sets it to 0.
- `load_hf_folder` reads a folder (safetensors only) for `train.init_from`: fine-tuning or continued
  pretraining from an exported or downloaded Llama / GPT-2 model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmtrain.errors import ConfigError
from llmtrain.model.config import ModelConfig, check_model_config

Tensor = torch.Tensor


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ----------------------------------------------------------------------------------------------
# Ours -> Hugging Face


def to_hf(state_dict: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(HF state dict, HF config dict) for LlamaForCausalLM (arch=llama) or GPT2LMHeadModel (gpt2).

    A tied output projection is left out of the state dict, as in HF's own checkpoints. A model option
    that neither class can represent is refused, naming the key (training-only options such as
    z_loss and the zero inits do not change the function and export as they are).
    """
    check_model_config(cfg)
    check_exportable(cfg)
    if cfg.arch == "llama":
        return _llama_to_hf(state_dict, cfg), llama_config_dict(cfg)
    if cfg.kv_heads != cfg.n_heads:
        raise ConfigError(
            f"model.n_kv_heads: GPT2LMHeadModel has no grouped-query attention "
            f"(n_kv_heads={cfg.kv_heads}, n_heads={cfg.n_heads}); export as arch=llama instead"
        )
    return _gpt2_to_hf(state_dict, cfg), gpt2_config_dict(cfg)


def check_exportable(cfg: ModelConfig) -> None:
    """ConfigError naming the first model.* option that LlamaForCausalLM / GPT2LMHeadModel lack."""
    target = "LlamaForCausalLM" if cfg.arch == "llama" else "GPT2LMHeadModel"
    if cfg.qk_norm:
        raise ConfigError(f"model.qk_norm: {target} has no query/key norms; train without it to export")
    if cfg.logit_softcap is not None:
        raise ConfigError(
            f"model.logit_softcap: {target} has no logit soft-capping; train without it to export"
        )
    native = "swiglu" if cfg.arch == "llama" else ("gelu", "relu2")
    if cfg.mlp_activation not in native:
        raise ConfigError(
            f"model.activation={cfg.mlp_activation}: {target}'s MLP is "
            f"{'gated SiLU (swiglu)' if cfg.arch == 'llama' else 'not gated (gelu or relu2)'}"
        )


def llama_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters, older versions rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
    }


def gpt2_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_dim,
        "activation_function": "relu2" if cfg.mlp_activation == "relu2" else "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _llama_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    V, H, K, Q = cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"][:V], "model.norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "mlp_norm.weight"]
        suffixes = ("weight", "bias") if cfg.use_bias else ("weight",)
        for suffix in suffixes:
            q, k, v = sd[f"{ours}attn.qkv.{suffix}"].split([H * Q, K * Q, K * Q])
            out[f"{hf}self_attn.q_proj.{suffix}"] = q
            out[f"{hf}self_attn.k_proj.{suffix}"] = k
            out[f"{hf}self_attn.v_proj.{suffix}"] = v
            out[f"{hf}self_attn.o_proj.{suffix}"] = sd[f"{ours}attn.proj.{suffix}"]
            for mine, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[f"{hf}mlp.{theirs}.{suffix}"] = sd[f"{ours}mlp.{mine}.{suffix}"]
    return {name: t.contiguous() for name, t in out.items()}


def _gpt2_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    V = cfg.vocab_size

    def bias(name: str, size: int) -> Tensor:  # GPT-2 always has biases; bias=False exports zeros
        ref = sd["tok_emb.weight"]
        return sd[name] if name in sd else ref.new_zeros(size)

    D, F = cfg.d_model, cfg.ffn_dim
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"][:V],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["norm_f.weight"],
        "transformer.ln_f.bias": bias("norm_f.bias", D),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for mine, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{hf}{theirs}.weight"] = sd[f"{ours}{mine}.weight"]
            out[f"{hf}{theirs}.bias"] = bias(f"{ours}{mine}.bias", D)
        for mine, theirs, size in (
            ("attn.qkv", "attn.c_attn", 3 * D),
            ("attn.proj", "attn.c_proj", D),
            ("mlp.up", "mlp.c_fc", F),
            ("mlp.down", "mlp.c_proj", D),
        ):
            out[f"{hf}{theirs}.weight"] = sd[f"{ours}{mine}.weight"].t()  # Conv1D: (in, out)
            out[f"{hf}{theirs}.bias"] = bias(f"{ours}{mine}.bias", size)
    return {name: t.contiguous() for name, t in out.items()}


# ----------------------------------------------------------------------------------------------
# Hugging Face -> ours


def from_hf(
    hf_state_dict: dict[str, Tensor], hf_config: dict[str, Any], *, vocab_multiple: int = 64
) -> tuple[dict[str, Tensor], ModelConfig]:
    """(our state dict, ModelConfig) from a LlamaForCausalLM or GPT2LMHeadModel checkpoint.

    Raises ConfigError for variants our model does not compute identically (rope scaling, other
    activations, a head dim that is not hidden/heads).
    """
    model_type = hf_config.get("model_type")
    if model_type == "llama":
        cfg = _llama_config(hf_config, vocab_multiple)
        sd = _llama_from_hf(hf_state_dict, cfg)
    elif model_type == "gpt2":
        cfg = _gpt2_config(hf_config, vocab_multiple)
        sd = _gpt2_from_hf(hf_state_dict, cfg)
    else:
        raise ConfigError(f"model_type: {model_type!r} is not supported (llama or gpt2)")
    check_model_config(cfg)
    return sd, cfg


def _llama_config(hf: dict[str, Any], vocab_multiple: int) -> ModelConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_parameters.rope_type: {rope_type!r} scaling is not supported (default only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act: {hf['hidden_act']!r} is not supported (silu only)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise ConfigError(f"head_dim: {head_dim} x {n_heads} heads != hidden_size {d_model} (not supported)")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ConfigError("attention_bias / mlp_bias: must be equal (model.bias covers both)")
    return ModelConfig(
        arch="llama",
        n_layers=hf["num_hidden_layers"],
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        vocab_multiple=vocab_multiple,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=bool(hf.get("attention_bias", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        init_std=hf.get("initializer_range", 0.02),
    )


def _gpt2_config(hf: dict[str, Any], vocab_multiple: int) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "relu2"):
        raise ConfigError(f"activation_function: {act!r} is not supported (gelu_new, relu2)")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise ConfigError(
            "scale_attn_weights / scale_attn_by_inverse_layer_idx: only the standard 1/sqrt(d) scale"
        )
    d_model = hf["n_embd"]
    return ModelConfig(
        arch="gpt2",
        n_layers=hf["n_layer"],
        d_model=d_model,
        n_heads=hf["n_head"],
        n_kv_heads=None,
        ffn_hidden=hf.get("n_inner") or 4 * d_model,
        activation="relu2" if act == "relu2" else None,
        max_seq_len=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        vocab_multiple=vocab_multiple,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bias=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


def _llama_from_hf(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    Vp = cfg.padded_vocab
    emb = _pad_rows(hf["model.embed_tokens.weight"], Vp)
    out = {"tok_emb.weight": emb, "norm_f.weight": hf["model.norm.weight"]}
    out["lm_head.weight"] = emb if cfg.tie_embeddings else _pad_rows(_required(hf, "lm_head.weight"), Vp)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[ours + "attn_norm.weight"] = hf[theirs + "input_layernorm.weight"]
        out[ours + "mlp_norm.weight"] = hf[theirs + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias") if cfg.use_bias else ("weight",):
            attn = theirs + "self_attn."
            out[f"{ours}attn.qkv.{suffix}"] = torch.cat(
                [hf[f"{attn}q_proj.{suffix}"], hf[f"{attn}k_proj.{suffix}"], hf[f"{attn}v_proj.{suffix}"]]
            )
            out[f"{ours}attn.proj.{suffix}"] = hf[f"{attn}o_proj.{suffix}"]
            for mine, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                out[f"{ours}mlp.{mine}.{suffix}"] = hf[f"{theirs}mlp.{hf_name}.{suffix}"]
    return {name: t.contiguous() for name, t in out.items()}


def _gpt2_from_hf(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    # Checkpoints on the Hub store the GPT2Model part without the "transformer." prefix.
    hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
    Vp = cfg.padded_vocab
    emb = _pad_rows(hf["wte.weight"], Vp)
    out = {
        "tok_emb.weight": emb,
        "pos_emb.weight": hf["wpe.weight"],
        "norm_f.weight": hf["ln_f.weight"],
        "norm_f.bias": hf["ln_f.bias"],
    }
    out["lm_head.weight"] = emb if cfg.tie_embeddings else _pad_rows(_required(hf, "lm_head.weight"), Vp)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        for mine, hf_name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{ours}{mine}.weight"] = hf[f"{theirs}{hf_name}.weight"]
            out[f"{ours}{mine}.bias"] = hf[f"{theirs}{hf_name}.bias"]
        for mine, hf_name in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            out[f"{ours}{mine}.weight"] = hf[f"{theirs}{hf_name}.weight"].t()  # Conv1D (in, out) -> (out, in)
            out[f"{ours}{mine}.bias"] = hf[f"{theirs}{hf_name}.bias"]
    return {name: t.contiguous() for name, t in out.items()}


def _required(sd: dict[str, Tensor], name: str) -> Tensor:
    if name not in sd:
        raise ConfigError(
            f"{name}: missing from the state dict of an untied model (tie_word_embeddings=false)"
        )
    return sd[name]


# Fields that decide the shape and the function of the model: an `init_from` folder must agree on all.
SHAPE_FIELDS = (
    "arch",
    "n_layers",
    "d_model",
    "n_heads",
    "kv_heads",
    "ffn_dim",
    "padded_vocab",
    "tie_embeddings",
    "use_bias",
    "norm_eps",
    "rope_theta",
    "mlp_activation",
    "qk_norm",
)


def load_hf_folder(folder: str | Path, expect: ModelConfig) -> dict[str, Tensor]:
    """Our state dict from a Hugging Face model folder (config.json + model.safetensors), e.g. one
    `llmtrain export` wrote: the weights `train.init_from` starts a run with.

    Only safetensors are read (nothing is unpickled). The folder's model must match `expect` in
    every field that shapes it; a mismatch names the key.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    where = f"train.init_from={folder}"
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(
                f"{where}: {path.name} not found (a Hugging Face folder with safetensors weights)"
            )
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        hf_state = load_file(str(weights_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise ConfigError(f"{where}: unreadable ({type(err).__name__}: {err})") from None
    try:
        state, theirs = from_hf(hf_state, hf_config, vocab_multiple=expect.vocab_multiple)
    except KeyError as err:
        raise ConfigError(f"{where}: {weights_path.name} lacks tensor {err}") from None
    for key in SHAPE_FIELDS:
        a, b = getattr(theirs, key), getattr(expect, key)
        if a != b:
            raise ConfigError(f"{where}: model.{key} is {a} there but {b} in this run's config")
    if theirs.max_seq_len < expect.max_seq_len and expect.arch == "gpt2":
        raise ConfigError(
            f"{where}: learned positions cover {theirs.max_seq_len} tokens, fewer than model.max_seq_len="
            f"{expect.max_seq_len}"
        )
    return state
