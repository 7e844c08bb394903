"""`llmtrain plan`: memory per GPU of a model, ZeRO stage and batch, before any GPU is rented.

Parameters come from the real model built on the meta device, so a change to the model changes the
plan. Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020) for Adam; the
activations are what our Transformer actually keeps for the backward pass, tensor by tensor (the
approach of Korthikanti et al. 2022, applied to this code: SDPA kernels, so no T x T matrix). The
derivation and its check against measured peaks are in docs/memory.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import torch

from llmtrain.config import Config, batch_layout
from llmtrain.distributed.ds_config import overlaps_comm
from llmtrain.errors import ConfigError
from llmtrain.kernels.chunked_ce import MIN_CHUNK_CUDA, default_chunk_size
from llmtrain.model.config import ModelConfig

GB = 1e9
ALLOWANCE_BYTES = 2 * GB
"""Fixed allowance, not derived: the CUDA context and NCCL's buffers (~1 GB) and the caching
allocator's fragmentation (~1 GB at these sizes)."""
# DeepSpeed 0.19's sizes in elements (defaults where deepspeed.config does not set them).
DS_ALLREDUCE_BUCKET = 500_000_000  # ZeRO-0's gradient all-reduce (engine.allreduce_gradients), fixed
DS_REDUCE_BUCKET = 500_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
MAX_BATCH = 1 << 20


@dataclass
class ParamCounts:
    total: int
    """Distinct parameters without the vocabulary's padding rows (Transformer.num_params)."""
    embedding: int
    non_embedding: int
    stored: int
    """Elements actually allocated (padding rows included): what the memory terms multiply."""
    largest_unit: int
    """Largest block or embedding/head matrix: what ZeRO-3 gathers at once."""


@dataclass
class StateTerm:
    name: str
    bytes_per_param: int
    sharded: bool
    """Divided over the data-parallel ranks at this ZeRO stage."""
    offloaded: bool = False
    """Kept in host memory (ZeRO-Offload) instead of on the GPU."""


@dataclass
class Activations:
    """Bytes of one micro batch's activations on one GPU."""

    saved: int
    """Kept for the backward pass at the end of the forward pass."""
    peak: int
    """The most held at once: `saved` plus the loss's gradients (or a recomputed block)."""
    per_layer: int
    head: int
    """The chunked cross-entropy at its peak (one chunk of logits, the gradients it computes)."""


@dataclass
class Plan:
    params: dict[str, int]
    world_size: int
    zero_stage: int
    precision: str
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool
    gpu_memory_gb: float
    model_state_terms: list[dict] = field(default_factory=list)
    model_state_gb_per_gpu: float = 0.0
    offloaded_gb_per_gpu: float = 0.0
    buffers_gb_per_gpu: float = 0.0
    activation_gb_per_gpu: float = 0.0
    activation_gb_per_gpu_without_checkpointing: float = 0.0
    activation_gb_per_gpu_with_checkpointing: float = 0.0
    logits_gb_per_gpu: float = 0.0
    allowance_gb: float = ALLOWANCE_BYTES / GB
    total_gb_per_gpu: float = 0.0
    fits: bool = False
    max_micro_batch: int = 0
    hint: str | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- parameters


def vocab_for_plan(cfg: Config) -> int:
    """model.vocab_size, else the tokenizer's configured size: what training would get after prepare."""
    return cfg.model.vocab_size if cfg.model.vocab_size is not None else cfg.tokenizer.vocab_size


def count_parameters(model_cfg: ModelConfig) -> ParamCounts:
    """Counts of the real Transformer, built on the meta device (no memory, so llama3_8b is free)."""
    from llmtrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(replace(model_cfg, compile=False))
    total = model.num_params()
    non_embedding = model.num_params(non_embedding=True)
    units = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    units += [model.tok_emb.weight.numel(), model.lm_head.weight.numel()]
    return ParamCounts(
        total=total,
        embedding=total - non_embedding,
        non_embedding=non_embedding,
        stored=sum(p.numel() for p in model.parameters()),
        largest_unit=max(units),
    )


# ---------------------------------------------------------------------------------- model states


def element_bytes(precision: str) -> int:
    """Bytes per activation / low-precision weight; `auto` plans for a GPU, where it means bf16."""
    return 4 if precision == "fp32" else 2


def state_terms(
    precision: str,
    stage: int,
    *,
    offload_optimizer: bool,
    offload_params: bool,
    gradients_sharded: bool | None = None,
) -> list[StateTerm]:
    """Adam's model states per parameter, and which of them the ZeRO stage shards.

    Mixed precision: 2 + 2 + 12 = 16 bytes (ZeRO paper, K = 12). fp32: weights 4, gradients 4, Adam 8;
    DeepSpeed's ZeRO optimizer (stage >= 1) still keeps its own fp32 copy of the shard it updates.
    `gradients_sharded` None = the paper's rule (stage >= 2); see `gradients_sharded`.
    """
    e = element_bytes(precision)
    kind = "fp32" if e == 4 else precision if precision in ("bf16", "fp16") else "bf16"
    grads_sharded = stage >= 2 if gradients_sharded is None else gradients_sharded
    terms = [
        StateTerm(f"weights ({kind})", e, sharded=stage >= 3, offloaded=offload_params),
        StateTerm(f"gradients ({kind})", e, sharded=grads_sharded),
    ]
    if e != 4 or stage >= 1:
        terms.append(StateTerm("fp32 master weights", 4, sharded=stage >= 1, offloaded=offload_optimizer))
    terms.append(StateTerm("Adam moments (fp32 m, v)", 8, sharded=stage >= 1, offloaded=offload_optimizer))
    if offload_optimizer:  # CPU Adam reads fp32 gradients of its shard in host memory
        terms.append(StateTerm("fp32 gradients for CPU Adam", 4, sharded=True, offloaded=True))
    return terms


def gradients_sharded(stage: int, zero: dict, accumulation: int) -> bool:
    """Whether each rank holds only its shard of the gradients at the peak.

    ZeRO-2/3 by design. DeepSpeed's ZeRO-1 too when it reduces during the backward (overlap_comm)
    into contiguous buckets and every micro batch ends a step: each gradient moves into a bucket as
    it is produced (measured: bench/bench_plan.py). With accumulation it keeps whole gradients.
    """
    if stage >= 2:
        return True
    contiguous = zero.get("contiguous_gradients", True) and zero.get("overlap_comm", True)
    return stage == 1 and contiguous and accumulation == 1


def term_bytes(term: StateTerm, params: int, world_size: int) -> float:
    per_param = term.bytes_per_param / world_size if term.sharded else term.bytes_per_param
    return per_param * params


def model_state_bytes(terms: list[StateTerm], params: int, world_size: int) -> tuple[float, float]:
    """(on each GPU, in host memory per GPU) for `params` stored elements."""
    on_gpu = sum(term_bytes(t, params, world_size) for t in terms if not t.offloaded)
    on_host = sum(term_bytes(t, params, world_size) for t in terms if t.offloaded)
    return on_gpu, on_host


def deepspeed_buffer_bytes(zero: dict, stage: int, precision: str, params: ParamCounts) -> float:
    """Working memory DeepSpeed 0.19 adds beside the states, at the sizes its config sets.

    ZeRO-0 all-reduces the gradients through flat copies of up to 5e8 elements. ZeRO-1/2 with
    contiguous gradients (our GPU default) stage them in `reduce_bucket_size` buffers, two with
    overlap_comm; without, each reduction flattens a bucket. ZeRO-3 reduces through one bucket and
    keeps gathered parameters up to `stage3_max_live_parameters` (1e9), i.e. all of a smaller model
    (`stage3_max_reuse_distance` keeps what the backward uses again), held twice: the all-gather's
    flat buffer and the parameters concatenated out of it (measured on CPU ranks, docs/memory.md).
    """
    e = element_bytes(precision)
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))
    if stage == 0:
        return min(params.stored, DS_ALLREDUCE_BUCKET) * e
    if stage in (1, 2):
        if not zero.get("contiguous_gradients", True):
            return min(params.stored, bucket) * e
        return (2 if zero.get("overlap_comm", True) else 1) * bucket * e
    live = int(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
    return bucket * e + 2 * min(params.stored, max(live, params.largest_unit)) * e


# ----------------------------------------------------------------------------------- activations


def activation_bytes(
    m: ModelConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool
) -> Activations:
    """What llmtrain.model.transformer keeps for the backward pass, tensor by tensor (docs/memory.md).

    Shapes: b micro batch, s sequence, h d_model, H heads, kv = key/value heads x head dim, F ffn,
    V vocabulary (the loss reads the head without its padding rows); e bytes per element of the model dtype, statistics are fp32.
    """
    e = element_bytes(precision)
    b, s, tokens = micro_batch, seq_len, micro_batch * seq_len
    h, H, F, L = m.d_model, m.n_heads, m.ffn_dim, m.n_layers
    kv = m.kv_heads * m.head_dim
    V = m.vocab_size
    llama = m.arch == "llama"
    # Norms, and the output in the model dtype that the next matmul keeps. RMSNorm (its own backward)
    # keeps its input and fp32 1/rms; LayerNorm an fp32 copy of its input (x itself in fp32), mean
    # and 1/std.
    norm = e * h + (e * h + 4 if llama else 4 * h + 8)
    # Attention: SDPA keeps its output and fp32 log-sum-exp; rotary makes new q, k; v (and GPT-2's
    # q, k) are views that keep the whole qkv output alive. A document mask sends SDPA to the
    # masked kernel, which wants k, v repeated to every head and keeps the mask in the model dtype.
    repeat_kv = m.doc_mask and m.kv_heads < H
    new_qk = llama or m.qk_norm  # rotary and QK-norm hand SDPA new q and k tensors
    attn = e * h + 4 * H + (e * h if new_qk else 0)
    attn += 2 * e * h if repeat_kv else (e * kv if new_qk else 0)
    if not (llama and repeat_kv) or m.qk_norm:  # QK-norm keeps its inputs, views of the qkv output
        attn += e * (h + 2 * kv)
    if m.qk_norm:
        attn += 4 * (H + m.kv_heads)  # fp32 1/rms per query and key head
    # SwiGLU: gate, silu(gate), up, product; GELU: its input, output; ReLU²: relu(input), output
    mlp = (4 if m.mlp_activation == "swiglu" else 2) * e * F
    dropout_masks = 2 * h if m.dropout > 0 else 0  # CUDA's bool masks after attention and MLP
    layer = tokens * (2 * norm + attn + mlp + dropout_masks) + (b * s * s * e if m.doc_mask else 0)

    inputs = tokens * 16  # token ids and targets (int64)
    if m.dropout > 0:
        inputs += tokens * h
    if llama:
        inputs += 2 * (tokens if m.doc_mask else s) * m.head_dim * 4  # rotary cos, sin (fp32)
    else:
        inputs += s * 8  # position ids
    if m.doc_mask:
        inputs += b * s * s  # the bool document mask
    final_norm = tokens * (norm - e * h)  # its output feeds the chunked loss, which does not keep it
    # Cross-entropy, chunk by chunk (llmtrain.kernels): the forward computes the gradients of the
    # hidden states (model dtype) and of the head (an fp32 V x h accumulator) and keeps only those.
    # At the forward's peak one chunk of C rows holds its logits (model dtype), an fp32 copy when that
    # is narrower, and a second fp32 buffer with the soft-cap (plus a V x h product in the model dtype
    # when that is not fp32); the backward scales the kept gradients into new tensors.
    rows = default_chunk_size(tokens, h, V, MIN_CHUNK_CUDA)
    kept_head = tokens * h * e + V * h * 4
    narrow = V * h * e if e != 4 else 0
    chunk = rows * V * (e + (4 if e != 4 else 0) + (4 if m.logit_softcap else 0))
    head = max(kept_head + chunk + narrow, 2 * kept_head + narrow)
    # A block's backward adds the incoming gradient and, in the MLP, gradients of its F-wide inputs.
    block_backward = tokens * (e * h + (2 if llama else 1) * e * F)
    if checkpointing:
        kept = inputs + L * tokens * e * h  # each block's input; its inside is recomputed
        saved = kept + final_norm + kept_head
        peak = kept + max(final_norm + head, layer + block_backward)
    else:
        saved = inputs + L * layer + final_norm + kept_head
        peak = inputs + L * layer + max(final_norm + head, block_backward)
    return Activations(saved=saved, peak=peak, per_layer=layer, head=head)


# ------------------------------------------------------------------------------------------ plan


def zero_settings(cfg: Config) -> tuple[int, bool, bool, dict]:
    """(stage, offload_optimizer, offload_params, raw zero_optimization) as DeepSpeed will see them."""
    ds = cfg.deepspeed
    zero = dict(ds.config.get("zero_optimization") or {})
    stage = int(zero.get("stage", ds.zero_stage))

    def offloaded(key: str) -> bool:
        device = (zero.get(key) or {}).get("device", "none")
        return device not in (None, "none")

    return (
        stage,
        ds.offload_optimizer or offloaded("offload_optimizer"),
        ds.offload_params or offloaded("offload_param"),
        zero,
    )


def make_plan(cfg: Config) -> Plan:
    model_cfg = replace(cfg.model, vocab_size=vocab_for_plan(cfg))
    world = cfg.plan.world_size
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    stage, offload_opt, offload_params, zero = zero_settings(cfg)
    zero.setdefault("overlap_comm", overlaps_comm(world, on_gpu=True))  # as the GPU ranks will run
    params = count_parameters(model_cfg)
    _, accumulation = batch_layout(cfg, world)
    terms = state_terms(
        precision,
        stage,
        offload_optimizer=offload_opt,
        offload_params=offload_params,
        gradients_sharded=gradients_sharded(stage, zero, accumulation),
    )
    on_gpu, on_host = model_state_bytes(terms, params.stored, world)
    buffers = deepspeed_buffer_bytes(zero, stage, precision, params)
    fixed = on_gpu + buffers + ALLOWANCE_BYTES
    micro, seq, ckpt = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.activation_checkpointing
    capacity = cfg.plan.gpu_memory_gb * GB

    def activations(batch: int, checkpointing: bool = ckpt) -> Activations:
        return activation_bytes(model_cfg, batch, seq, precision, checkpointing)

    act = activations(micro)
    total = fixed + act.peak
    best = largest_batch(lambda batch: fixed + activations(batch).peak <= capacity)
    plan = Plan(
        params={"total": params.total, "embedding": params.embedding, "non_embedding": params.non_embedding},
        world_size=world,
        zero_stage=stage,
        precision=precision,
        micro_batch_size=micro,
        seq_len=seq,
        activation_checkpointing=ckpt,
        gpu_memory_gb=cfg.plan.gpu_memory_gb,
        model_state_terms=[
            {**asdict(t), "gb_per_gpu": term_bytes(t, params.stored, world) / GB} for t in terms
        ],
        model_state_gb_per_gpu=on_gpu / GB,
        offloaded_gb_per_gpu=on_host / GB,
        buffers_gb_per_gpu=buffers / GB,
        activation_gb_per_gpu=act.peak / GB,
        activation_gb_per_gpu_without_checkpointing=activations(micro, False).peak / GB,
        activation_gb_per_gpu_with_checkpointing=activations(micro, True).peak / GB,
        logits_gb_per_gpu=act.head / GB,
        total_gb_per_gpu=total / GB,
        fits=total <= capacity,
        max_micro_batch=best,
    )
    if not plan.fits or best == 0:
        plan.hint = hint(plan, fixed > capacity)
    plan.notes = caveats(cfg)
    return plan


def caveats(cfg: Config) -> list[str]:
    """Settings whose effect the activation count does not model (it counts the plain PyTorch path)."""
    notes = []
    if set(cfg.model.kernels) - {"fused_ce"}:
        notes.append(
            f"model.kernels={list(cfg.model.kernels)}: the fused norm and SwiGLU keep less than the plain "
            "path counted here, so the activations are an upper bound"
        )
    if cfg.model.compile:
        notes.append("model.compile: fused graphs may keep fewer tensors; the activations are an upper bound")
    if cfg.model.dropout > 0:
        notes.append("model.dropout > 0: counted as CUDA's 1-byte masks; attention dropout assumed fused")
    return notes


def largest_batch(fits) -> int:
    """The largest micro batch for which `fits(batch)` holds (memory grows with the batch); 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def hint(plan: Plan, states_too_big: bool) -> str:
    """What would bring the plan under the GPU's memory, most effective first."""
    options = []
    if plan.zero_stage < 3:
        options.append(f"a higher ZeRO stage (deepspeed.zero_stage={plan.zero_stage + 1})")
    options.append(f"more GPUs (plan.world_size > {plan.world_size})")
    if not states_too_big:
        if not plan.activation_checkpointing:
            options.append("model.activation_checkpointing=true")
        options.append("a smaller train.micro_batch_size or train.seq_len")
    elif plan.offloaded_gb_per_gpu == 0:
        options.append("CPU offload (deepspeed=zero3_offload)")
    what = "the model states alone do not fit" if states_too_big else "does not fit"
    return f"{what}; try " + ", or ".join(options)


# ---------------------------------------------------------------------------------------- output


def format_table(plan: Plan) -> str:
    p = plan.params
    rows = [
        f"llmtrain plan: {plan.world_size} GPU(s) x {plan.gpu_memory_gb:g} GB, ZeRO-{plan.zero_stage}, "
        f"{plan.precision}, micro batch {plan.micro_batch_size} x {plan.seq_len} tokens "
        "(GB = 10^9 bytes, per GPU)",
        f"parameters {p['total']:,} (embedding {p['embedding']:,}, non-embedding {p['non_embedding']:,})",
        "",
        f"{'term':<52}{'GB':>10}",
    ]

    def row(name: str, gb: float) -> None:
        rows.append(f"{name:<52}{gb:>10.2f}")

    for t in plan.model_state_terms:
        where = "host (offloaded), " if t["offloaded"] else ""
        share = f"/ {plan.world_size} (sharded)" if t["sharded"] else "(every GPU)"
        row(f"  {t['name']}: {t['bytes_per_param']} B/param {where}{share}", t["gb_per_gpu"])
    row("model states on the GPU", plan.model_state_gb_per_gpu)
    if plan.offloaded_gb_per_gpu:
        row("model states in host memory (per GPU)", plan.offloaded_gb_per_gpu)
    if plan.buffers_gb_per_gpu:
        row("DeepSpeed gradient / gather buffers", plan.buffers_gb_per_gpu)
    ckpt = "with" if plan.activation_checkpointing else "without"
    row(f"activations at their peak ({ckpt} checkpointing)", plan.activation_gb_per_gpu)
    row("  of which logits + cross-entropy", plan.logits_gb_per_gpu)
    other = "with" if not plan.activation_checkpointing else "without"
    other_gb = (
        plan.activation_gb_per_gpu_with_checkpointing
        if not plan.activation_checkpointing
        else plan.activation_gb_per_gpu_without_checkpointing
    )
    row(f"  ({other} checkpointing it would be)", other_gb)
    row("fixed allowance: CUDA context, allocator fragmentation", plan.allowance_gb)
    row("total", plan.total_gb_per_gpu)
    verdict = "fits" if plan.fits else "does NOT fit"
    rows += [
        "",
        f"{verdict} in {plan.gpu_memory_gb:g} GB; largest micro batch that fits: {plan.max_micro_batch}",
    ]
    if plan.hint:
        rows.append(f"hint: {plan.hint}")
    rows += [f"note: {note}" for note in plan.notes]
    return "\n".join(rows)


def main(cfg: Config) -> int:
    if cfg.train.precision not in ("bf16", "fp16", "fp32", "auto"):
        raise ConfigError(f"train.precision: cannot plan for {cfg.train.precision!r}")
    plan = make_plan(cfg)
    print(json.dumps(asdict(plan)) if cfg.plan.json else format_table(plan))
    return 0
