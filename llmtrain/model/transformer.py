"""The decoder-only Transformer: Llama-style and GPT-2-style in one implementation.

Read top to bottom: kernels, norms, rotary embeddings, document masking, attention, MLP, block,
KV cache, model. Shape letters: B batch, T time (query tokens), S key tokens, D d_model,
H query heads, K key/value heads, Q head dim, F ffn width, V padded vocabulary.

`arch: llama`  RMSNorm, SwiGLU, rotary positions (half-split pairs, as in Hugging Face), GQA, no biases.
`arch: gpt2`   LayerNorm, tanh-GELU, learned positions, biases.
Everything else (tying, dropout, init, padding, masking, checkpointing) is shared, and so are the
options of newer recipes, each off by default (see ModelConfig): QK-norm, squared-ReLU MLP, logit
soft-capping, zero-initialized head and projections, z-loss.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmtrain.kernels import fused_linear_cross_entropy as chunked_cross_entropy  # never imports Triton
from llmtrain.model.config import ModelConfig, check_model_config

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# Fused kernels (llmtrain.kernels), chosen by cfg.kernels.

_kernel_warning_shown = False


def load_kernels(names: list[str]) -> dict[str, Callable]:
    """The fused kernels named in `names`; {} (plain PyTorch below) if llmtrain.kernels won't import.

    Imported lazily so that a model without kernels never touches Triton.
    """
    global _kernel_warning_shown
    if not names:
        return {}
    try:
        kernels = importlib.import_module("llmtrain.kernels")
        table = {
            "rmsnorm": kernels.rms_norm,
            "swiglu": kernels.swiglu,
            "fused_ce": kernels.fused_linear_cross_entropy,
        }
    except (ImportError, AttributeError) as err:
        if not _kernel_warning_shown:
            warnings.warn(
                f"model.kernels={list(names)} requested but llmtrain.kernels is unavailable ({err}); "
                "using the plain PyTorch implementations",
                stacklevel=2,
            )
            _kernel_warning_shown = True
        return {}
    return {name: table[name] for name in names}


# ----------------------------------------------------------------------------------------------
# Norms. Statistics in fp32: bf16's 8-bit mantissa loses the mean over thousands of features.


def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight over the last dim, in fp32, with the backward written out: it keeps x
    and 1/rms only (autograd's version of the formula keeps an fp32 copy and the normalized x as
    well) and takes half the passes over memory (2x faster on a CPU at d=128, forward + backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_at_least_fp32(x))
        mean_square = torch.linalg.vecdot(xf, xf).div_(xf.shape[-1])  # (...,): one pass, no x² tensor
        rstd = mean_square.add_(eps).rsqrt_().unsqueeze(-1)  # (..., 1)
        # A sum of squares past fp32's range (|x| ~ 1e19) gives rstd 0 and a quietly zero output with
        # zero gradients: make it nan instead, so that the loss and the non-finite guard see it.
        rstd.masked_fill_(rstd == 0, float("nan"))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        grad_normed = grad * weight.to(rstd.dtype)
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)) over the last dim
        mean_dot = torch.linalg.vecdot(grad_normed, normed).div_(x.shape[-1]).unsqueeze(-1)
        grad_x = grad_normed.sub_(normed.mul_(mean_dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel: Callable | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps)
        return RMSNormFunction.apply(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig, kernels: dict[str, Callable]) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps, kernels.get("rmsnorm"))
    return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.use_bias)


class OutputHead(nn.Linear):
    """The output projection. `score` (hidden, weight) -> loss runs a loss that reads the weight
    itself (the chunked cross-entropy) inside this module's forward: ZeRO-3 gathers a module's
    parameters around its own forward only, compiled or not."""

    def forward(self, x: torch.Tensor, score: Callable | None = None) -> torch.Tensor:
        if score is None:
            return super().forward(x)
        return score(x, self.weight)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings, computed in fp32 on the fly (cheap next to the model) rather than
# kept as buffers, which `model.to(torch.bfloat16)` would round.


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) -> cos, sin of shape (T, Q) or (B, 1, T, Q), fp32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (Q/2,)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, Q/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, Q): pairs are (i, i + Q/2)
    cos, sin = angles.cos(), angles.sin()
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Q), broadcast over heads
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+Q/2}) pair of x (B, H, T, Q) by its position's angle, in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Document masking for packed sequences. doc_ids (B, T) numbers the documents of each row in
# order (0 at the window start, +1 at each token that starts a new document).


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) position of each token inside its own document (restarts at 0)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, 0).cummax(dim=1).values  # index of the document's first token
    return idx - start_idx


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1, T, T) bool, True where query t may attend to key s: same document, s <= t.

    Block-diagonal and causal; the diagonal is always True, so no softmax row is empty.
    """
    T = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal)[:, None]


# ----------------------------------------------------------------------------------------------
# Attention and MLP.


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        H, K, Q = self.n_heads, self.n_kv_heads, self.head_dim
        self.qkv = nn.Linear(cfg.d_model, (H + 2 * K) * Q, bias=cfg.use_bias)  # q, k, v in one matmul
        self.proj = nn.Linear(H * Q, cfg.d_model, bias=cfg.use_bias)  # residual projection
        # QK-norm: one gain per head dim, shared by the heads (as Qwen3's q_norm / k_norm)
        self.q_norm = RMSNorm(Q, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Q, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Q = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * Q, K * Q, K * Q], dim=-1)
        q = q.view(B, T, H, Q).transpose(1, 2)  # (B, H, T, Q)
        k = k.view(B, T, K, Q).transpose(1, 2)  # (B, K, T, Q)
        v = v.view(B, T, K, Q).transpose(1, 2)  # (B, K, T, Q)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over Q, per head and position
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Q): every key so far
        # Without a mask, queries and keys aligned one-to-one are plain causal (training, prefill);
        # one new query against a cache sees every key. Other cases come with an explicit mask.
        is_causal = attn_mask is None and q.shape[2] == k.shape[2]
        enable_gqa = False
        if K != H:
            if attn_mask is None:
                enable_gqa = True  # flash kernels read the shared k/v heads without copying
            else:
                # the masked (memory-efficient) kernel wants equal heads: query head h uses kv head h // (H/K)
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        # SDPA's fused kernels keep the softmax in fp32 internally, so q and k stay in the model dtype.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=enable_gqa,
        )  # (B, H, T, Q)
        y = y.transpose(1, 2).reshape(B, T, H * Q)  # (B, T, H*Q)
        return self.resid_dropout(self.proj(y))


class ReLUSquared(torch.autograd.Function):
    """relu(x)² with its backward written out, 2 * relu(x) * grad: two passes each way where
    autograd's relu-then-square takes five, and it keeps only relu(x), as autograd did."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        relu = F.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (relu,) = ctx.saved_tensors
        return torch.mul(grad, relu).mul_(2.0)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, swiglu: Callable | None = None):
        super().__init__()
        self.activation = cfg.mlp_activation
        self.gated = self.activation == "swiglu"
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.use_bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.use_bias)  # residual projection
        self.dropout = nn.Dropout(cfg.dropout)
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate(x), self.up(x)  # (B, T, F) each
            h = self.swiglu(gate, up) if self.swiglu is not None else F.silu(gate) * up
        elif self.activation == "relu2":
            h = ReLUSquared.apply(self.up(x))
        else:
            h = F.gelu(self.up(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.down(h))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kernels: dict[str, Callable]):
        super().__init__()
        self.attn_norm = make_norm(cfg, kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, kernels)
        self.mlp = MLP(cfg, kernels.get("swiglu"))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------
# KV cache for incremental decoding.


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens; `length` are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)  # (L, B, K, S, Q)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, Q) after the filled part; return all keys and values (B, K, length+T, Q)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------------
# The model.


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init_weights: bool = True):
        """`init_weights=False` leaves our initialization to a later `reset_parameters(gathered=...)`:
        a model built with its parameters partitioned (ZeRO-3's zero.Init) has nothing to write into yet."""
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = cfg.padded_vocab  # rows past vocab_size are never looked up or scored
        kernels = load_kernels(cfg.kernels)
        self.tok_emb = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg, kernels)
        self.lm_head = OutputHead(cfg.d_model, self.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.fused_ce = kernels.get("fused_ce")
        if init_weights:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, gathered: Callable[[list[nn.Parameter]], Any] | None = None) -> None:
        """N(0, init_std) weights, zero biases, unit norms; residual projections scaled by
        1/sqrt(2*n_layers) so the residual stream's variance does not grow with depth (GPT-2).

        `gathered(params)`, when given, is a context manager that makes partitioned parameters whole
        while inside (and keeps what was written): one module's at a time, in the same order and with
        the same random draws as the eager build, so both give the same weights bit for bit.
        """
        whole = gathered or (lambda params: contextlib.nullcontext())
        std = self.cfg.init_std
        for module in self.modules():
            with whole(list(module.parameters(recurse=False))):
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, RMSNorm | LayerNorm):
                    nn.init.ones_(module.weight)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp.down.weight):
                with whole([weight]):
                    nn.init.normal_(weight, mean=0.0, std=residual_std)
                    if self.cfg.zero_init_proj:
                        weight.zero_()  # drawn first all the same: the other weights keep their values
        for weight in (self.tok_emb.weight, self.lm_head.weight):
            with whole([weight]):
                weight[self.vocab_size :].zero_()
        if self.cfg.zero_init_head:
            with whole([self.lm_head.weight]):
                self.lm_head.weight.zero_()

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters, not counting the vocabulary's padding rows (never used).

        non_embedding drops the input lookup tables (token, position) but keeps the output
        projection, a real matmul even when tied to the token embedding (nanoGPT, torchtitan).
        """
        D = self.cfg.d_model
        tied = self.cfg.tie_embeddings
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        n -= (self.padded_vocab - self.vocab_size) * D * (1 if tied else 2)
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not tied:
                n -= self.vocab_size * D
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or the mean cross-entropy over targets (B, T) that
        are not -100. doc_ids (B, T) is used only with cfg.doc_mask (loader batches carry T+1
        columns: pass doc_ids[:, :-1] with the inputs)."""
        T = input_ids.shape[1]
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if self.cfg.doc_mask and doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(
                    f"doc_ids {tuple(doc_ids.shape)} must match input_ids {tuple(input_ids.shape)}"
                )
            positions = document_positions(doc_ids)  # (B, T)
            attn_mask = document_mask(doc_ids)  # (B, 1, T, T)
        else:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
            attn_mask = None  # plain causal: the fast default
        x = self._embed(input_ids, positions)  # (B, T, D)
        rope = self._rope(positions)
        checkpointing = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                # keep only each block's input; recompute its insides in the backward pass
                x = checkpoint(block, x, rope, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask)
        x = self.norm_f(x)  # (B, T, D)
        if targets is None:
            return self._softcap(self.lm_head(x))  # (B, T, V)
        return self._loss(x, targets)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (T, D) or (B, T, D)
        return self.emb_dropout(x)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.arch != "llama":
            return None
        return rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the scored targets, chunk by chunk (llmtrain.kernels): the (B*T, V)
        logits are never materialized, and on a CPU it is also 1.5x faster than one F.cross_entropy
        at vocab 4096 (no pass over freshly allocated tokens x vocab memory). The Triton kernel runs
        each chunk with model.kernels=[fused_ce], PyTorch otherwise; same value and gradients."""
        V = self.vocab_size
        hidden = x.reshape(-1, x.shape[-1])  # (B*T, D)
        targets = targets.reshape(-1).long()  # the loader's int32 ids, widened on the device
        # a micro-batch without scored targets (a chat prompt filling the window) contributes 0, not 0/0
        scored = (targets != IGNORE_INDEX).sum().clamp(min=1)
        cross_entropy = self.fused_ce or functools.partial(chunked_cross_entropy, triton=False)

        def loss_sum(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return cross_entropy(
                h,
                weight[:V],  # padding columns dropped: never a target, no softmax mass
                targets,
                ignore_index=IGNORE_INDEX,
                softcap=self.cfg.logit_softcap,
                z_loss=self.cfg.z_loss if self.training else 0.0,  # validation reports cross-entropy alone
                reduction="sum",
            )

        return self.lm_head(hidden, score=loss_sum) / scored

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output (..., D) -> logits (..., vocab_size): final norm, head, the padding
        columns dropped, soft-capped. What every decoder outside the model should call."""
        return self._softcap(self.lm_head(self.norm_f(x))[..., : self.vocab_size])

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    # ------------------------------------------------------------------------------------------
    # Incremental decoding.

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens, on the model's device and dtype."""
        return KVCache(self.cfg, batch, max_len, self.tok_emb.weight.device, self.tok_emb.weight.dtype)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run new tokens (B, T) after the `cache.length` cached ones (no cache: a whole prefix);
        logits (B, T, vocab_size), or (B, vocab_size) of the last position with `last_only`.

        By default positions continue from the cache and the mask is causal. A left-padded batch
        passes its own: positions (B, T) counted from each row's first real token and a boolean
        attn_mask (B, 1, T, S) that hides the padding (see llmtrain.model.sampling).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
            if start > 0 and T > 1:  # a chunk after a prefix: query t sees keys 0 .. start+t
                keys = torch.arange(start + T, device=input_ids.device)
                attn_mask = keys[None, :] <= positions[:, None]  # (T, S)
        x = self._embed(input_ids, positions)
        rope = self._rope(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, cache, layer)
        if cache is not None:
            cache.length += T
        return self.output_logits(x[:, -1] if last_only else x)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        *,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to input_ids (B, T0), with a KV cache unless
        `use_cache=False` (the whole prefix recomputed each step: the same tokens, slower).

        temperature <= 0 means greedy. Rows that emitted eos_id are padded with eos_id; decoding
        stops when every row has. Prompts of different lengths, per-row generators, streaming and
        stop strings: `llmtrain.model.sampling.decode`.
        """
        from llmtrain.model.sampling import SamplingParams, decode

        B, T0 = input_ids.shape
        if T0 + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt of {T0} tokens + {max_new_tokens} new exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        was_training = self.training
        self.eval()  # restored even when sampling fails, so a caller's training run is not left in eval
        try:
            stops = () if eos_id is None else (eos_id,)
            rows = decode(
                self, input_ids, max_new_tokens, params, rng=generator, stop_ids=stops, use_cache=use_cache
            )
        finally:
            self.train(was_training)
        width = max((len(r) for r in rows), default=0)
        fill = 0 if eos_id is None else eos_id  # only rows that ended on eos_id are short
        new = [r + [fill] * (width - len(r)) for r in rows]
        new_ids = torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device).reshape(B, width)
        return torch.cat([input_ids, new_ids], dim=1)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy when temperature <= 0, else softmax sampling after
    top-k / top-p (`llmtrain.model.sampling`); `seen` (B, V) marks tokens the penalty applies to."""
    from llmtrain.model.sampling import SamplingParams, next_tokens

    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    return next_tokens(logits, params, generator, seen)
