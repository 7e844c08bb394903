"""Optimizer parameter groups: which parameters decay, and (optim=muon) which ones Muon updates.

Decaying norm gains, biases and embedding rows pulls them toward zero for no regularisation benefit
(the usual GPT-2 / Llama recipe), so they go into a no-decay group unless
`optim.decay_norms_and_biases` / `optim.decay_embeddings` ask otherwise.

Muon orthogonalizes the update of a weight matrix that maps one hidden space to another; the token
embedding (a lookup table: each row sees only its own tokens' gradient) and the output head (a
classifier over the vocabulary) are not such maps, and norms and biases are vectors, so all of those
stay with AdamW (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training").
"""

from __future__ import annotations

import torch
from torch import nn

from llmtrain.train.config import OptimConfig

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
        nn.GroupNorm,
        nn.modules.batchnorm._BatchNorm,
    )
    if t is not None
)


def _is_norm_module(module: nn.Module) -> bool:
    # Our own RMSNorm (and other libraries') is not an nn.LayerNorm; go by the class name too.
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def _ndim(param: nn.Parameter) -> int:
    """The parameter's own rank: under ZeRO-3's zero.Init its data is an empty 1-D partition and the
    real shape is `ds_shape` (reading `.ndim` would put every matrix in the no-decay group)."""
    return len(getattr(param, "ds_shape", param.shape))


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """{parameter name: "embedding" | "norm" | "bias" | "head" | "matrix"} over trainable parameters.

    "head" is an untied output projection (`model.lm_head`); "matrix" every other weight matrix.

    A weight shared between modules (tied input embedding and output head) appears once, under its
    first name, and counts as an embedding if any module holding it is an nn.Embedding.
    """
    embedding_ids: set[int] = set()
    norm_ids: set[int] = set()
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        if isinstance(module, nn.Embedding):
            embedding_ids.update(map(id, own))
        elif _is_norm_module(module):
            norm_ids.update(map(id, own))
    head = getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    kinds: dict[str, str] = {}
    for name, param in model.named_parameters():  # de-duplicates tied parameters
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            kinds[name] = "embedding"
        elif id(param) in norm_ids or (_ndim(param) == 1 and not name.endswith("bias")):
            kinds[name] = "norm"
        elif _ndim(param) <= 1:
            kinds[name] = "bias"
        elif id(param) in head_ids:
            kinds[name] = "head"
        else:
            kinds[name] = "matrix"
    return kinds


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Decay and no-decay groups for AdamW: each a dict with "params", "weight_decay" and "name".

    Empty groups are left out (a model without biases and norms has one group). Order follows
    `model.named_parameters()`, so every rank builds identical groups.
    """
    if optim.name == "muon":
        return muon_param_groups(model, optim)
    params = dict(model.named_parameters())
    decay, no_decay = [], []
    for name, kind in classify_parameters(model).items():
        decays = (
            kind in ("matrix", "head")
            or (kind == "embedding" and optim.decay_embeddings)
            or (kind in ("norm", "bias") and optim.decay_norms_and_biases)
        )
        (decay if decays else no_decay).append(params[name])
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def muon_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Groups for DeepSpeed's MuonWithAuxAdam, each tagged `use_muon` (and every parameter with it).

    Muon: the hidden matrices, at optim.muon_lr. AdamW: the output head and (with decay_embeddings)
    the embeddings with weight decay, the rest without, at optim.lr. Every group carries its own lr,
    so the schedule scales them together (see `lr_scales`).
    """
    params = dict(model.named_parameters())
    muon, decay, no_decay = [], [], []
    for name, kind in classify_parameters(model).items():
        if kind == "matrix":
            muon.append(params[name])
        elif (
            kind == "head"
            or (kind == "embedding" and optim.decay_embeddings)
            or (kind in ("norm", "bias") and optim.decay_norms_and_biases)
        ):
            decay.append(params[name])
        else:
            no_decay.append(params[name])
    adam = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps, "use_muon": False}
    groups = [
        {
            "params": muon,
            "name": "muon",
            "use_muon": True,
            "lr": optim.muon_lr,
            "momentum": optim.muon_momentum,
            "weight_decay": optim.muon_weight_decay,
            "ns_method": optim.muon_ns_method,
        },
        {"params": decay, "name": "adam_decay", "weight_decay": optim.weight_decay, **adam},
        {"params": no_decay, "name": "adam_no_decay", "weight_decay": 0.0, **adam},
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        for param in group["params"]:
            # DeepSpeed's ZeRO optimizers read the tag from the parameter itself.
            param.use_muon = group["use_muon"]
    return groups


def lr_scales(groups: list[dict], optim: OptimConfig) -> list[float]:
    """Each group's peak lr as a multiple of optim.lr: the schedule's lr(step) times it is the group's lr."""
    return [g.get("lr", optim.lr) / optim.lr for g in groups]


def adamw(
    groups: list[dict], optim_cfg: OptimConfig, lr: float, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """torch AdamW over parameter groups (each carrying its weight_decay); the trainer's optimizer.

    `fused=None` picks the fused kernel when every parameter is a floating tensor on CPU or CUDA
    (measured ~1.4x faster than foreach on the 2-core CPU sandbox), else the foreach implementation.
    """
    if fused is None:
        fused = all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"]
        )
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, **kwargs
    )
