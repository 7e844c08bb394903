"""`llmtrain plan`: parameter counts of the real model, ZeRO's model states, activations as the model
keeps them, the largest micro batch, and the command line."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import replace

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from llmtrain.cli import main
from llmtrain.config import load_config
from llmtrain.model.config import ModelConfig
from llmtrain.model.flops import param_counts
from llmtrain.model.transformer import Transformer
from llmtrain.plan import GB, activation_bytes, count_parameters, make_plan, model_state_bytes, state_terms

# (vocabulary of the published tokenizer, published parameter count)
PUBLISHED = {
    "gpt2_124m": (50257, 124_439_808),
    "llama2_7b": (32000, 6_738_415_616),
    "llama3_8b": (128256, 8_030_261_248),
}


@functools.cache
def _composed(model: str):
    return load_config([f"model={model}"])


def config(model: str, **changes):
    """A copy of the composed preset with `section__key=value` changes (composing costs ~0.2 s)."""
    cfg = copy.deepcopy(_composed(model))
    for name, value in changes.items():
        section, key = name.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def plan_for(model: str, **changes):
    return make_plan(config(model, **changes))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_the_published_ones_and_the_formulas(name):
    vocab, published = PUBLISHED[name]
    model = replace(_composed(name).model, vocab_size=vocab)
    counts = count_parameters(model)
    assert counts.total == published
    assert (counts.total, counts.non_embedding, counts.embedding) == tuple(
        param_counts(model)[k] for k in ("total", "non_embedding", "embedding")
    )


def test_parameter_counts_drop_the_vocab_padding_that_the_memory_still_holds():
    counts = count_parameters(
        ModelConfig(vocab_size=1000, vocab_multiple=64, d_model=64, tie_embeddings=True)
    )
    assert counts.stored - counts.total == (1024 - 1000) * 64


# global batch 128 = micro 8 x 8 GPUs x 2 accumulation steps: the paper's accounting holds exactly
ACCUMULATING = {"train__global_batch_size": 128, "model__vocab_size": 128256}


@pytest.mark.parametrize(
    ("stage", "bytes_per_param"),
    [(0, 16), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)],
)
def test_bf16_model_states_follow_the_zero_paper(stage, bytes_per_param):
    plan = plan_for("llama_1b", **ACCUMULATING, deepspeed__zero_stage=stage)
    assert plan.params["total"] == 1_235_814_400
    assert plan.model_state_gb_per_gpu * GB / plan.params["total"] == pytest.approx(bytes_per_param)
    sharded = {t["name"].split(" (")[0] for t in plan.model_state_terms if t["sharded"]}
    expected = [set(), {"fp32 master weights", "Adam moments"}, {"gradients"}, {"weights"}]
    assert sharded == set().union(*expected[: stage + 1])


def test_zero1_without_accumulation_keeps_only_its_gradient_shard():
    """DeepSpeed's ZeRO-1 with overlap_comm moves each gradient into a bucket as it is produced."""
    plan = plan_for("llama_1b", model__vocab_size=128256, deepspeed__zero_stage=1)
    assert plan.model_state_gb_per_gpu * GB / plan.params["total"] == pytest.approx(2 + 14 / 8)
    cfg = config("llama_1b", model__vocab_size=128256, deepspeed__zero_stage=1)
    cfg.deepspeed.config = {"zero_optimization": {"overlap_comm": False}}
    assert make_plan(cfg).model_state_gb_per_gpu * GB / plan.params["total"] == pytest.approx(4 + 12 / 8)


@pytest.mark.parametrize(
    ("stage", "bytes_per_param"),
    # weights 4, gradients 4, Adam 8; ZeRO's optimizer adds its fp32 copy of the shard (4)
    [(0, 16), (1, 8 + 12 / 4), (2, 4 + 16 / 4), (3, 20 / 4)],
)
def test_fp32_model_states_split_weights_gradients_and_adam(stage, bytes_per_param):
    plan = plan_for(
        "llama_1b",
        **ACCUMULATING,
        train__precision="fp32",
        deepspeed__zero_stage=stage,
        plan__world_size=4,
    )
    assert plan.model_state_gb_per_gpu * GB / plan.params["total"] == pytest.approx(bytes_per_param)


def test_cpu_offload_moves_the_optimizer_and_weights_off_the_gpu():
    on_gpu = plan_for("llama_1b", deepspeed__zero_stage=3)
    offload = plan_for(
        "llama_1b", deepspeed__zero_stage=3, deepspeed__offload_optimizer=True, deepspeed__offload_params=True
    )
    assert on_gpu.offloaded_gb_per_gpu == 0
    # only the bf16 gradient shard (2 bytes / 8) stays; master, Adam, weights and CPU Adam's fp32
    # gradients (16 + 2 bytes / 8) go to the host
    assert offload.model_state_gb_per_gpu == pytest.approx(on_gpu.model_state_gb_per_gpu * 2 / 16)
    assert offload.offloaded_gb_per_gpu == pytest.approx(on_gpu.model_state_gb_per_gpu * 18 / 16)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_more_gpus_or_a_higher_stage_never_need_more_model_state_per_gpu(precision):
    def per_gpu(stage: int, world: int) -> float:
        terms = state_terms(precision, stage, offload_optimizer=False, offload_params=False)
        return model_state_bytes(terms, 1_000_000, world)[0]

    worlds = (2, 8, 64) if precision == "fp32" else (1, 2, 8, 64)
    grid = {(stage, world): per_gpu(stage, world) for stage in range(4) for world in worlds}
    for (stage, world), gb in grid.items():
        assert all(grid[s, w] <= gb for s, w in grid if s >= stage and w >= world)
    assert grid[3, 64] < grid[0, worlds[0]] / 25  # and sharding does divide
    if precision == "fp32":  # the exception: on one GPU, ZeRO's fp32 copy of the weights costs 4 bytes
        assert per_gpu(1, 1) == per_gpu(0, 1) + 4_000_000


@pytest.mark.parametrize("name", ["tiny", "mini", "gpt2_124m", "llama_125m", "llama3_8b"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_never_needs_more_activation_memory(name, precision):
    model = replace(_composed(name).model, vocab_size=32000)
    for batch, seq in [(1, 128), (4, 256), (8, 1024)]:
        full = activation_bytes(model, batch, seq, precision, checkpointing=False)
        ckpt = activation_bytes(model, batch, seq, precision, checkpointing=True)
        bigger = activation_bytes(model, batch + 1, seq, precision, checkpointing=False)
        assert ckpt.peak < full.peak < bigger.peak
        assert ckpt.saved < full.saved


def _saved_for_backward(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Bytes the autograd graph keeps after one forward pass (each storage once, parameters excluded)."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    doc_ids = (torch.arange(seq) // 10).expand(batch, seq).contiguous()
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids[:, :-1], ids[:, 1:], doc_ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize(
    "shape",
    [
        {"arch": "llama"},
        {"arch": "llama", "n_kv_heads": 2},
        {"arch": "llama", "n_kv_heads": 2, "doc_mask": True},
        {"arch": "gpt2"},
        {"arch": "gpt2", "doc_mask": True, "tie_embeddings": True},
        {"arch": "llama", "activation": "relu2", "qk_norm": True, "logit_softcap": 5.0},
        {"arch": "llama", "n_kv_heads": 2, "doc_mask": True, "qk_norm": True},
        {"arch": "gpt2", "qk_norm": True},
    ],
)
def test_saved_activations_are_what_the_model_keeps_for_backward(shape):
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=500, max_seq_len=64, **shape)
    measured = _saved_for_backward(cfg, batch=2, seq=40)
    planned = activation_bytes(cfg, 2, 40, "fp32", checkpointing=False).saved
    assert abs(planned - measured) <= 0.005 * measured, (planned, measured)


def test_the_chunked_loss_holds_one_chunk_of_logits_not_all_of_them():
    model = replace(_composed("llama_1b").model, vocab_size=128256)
    act = activation_bytes(model, 4, 2048, "bf16", checkpointing=False)
    V, D, tokens = 128256, 2048, 4 * 2048
    kept = tokens * D * 2 + V * D * 4  # the hidden states' gradient (bf16), the head's (fp32)
    chunk = 4096 * V * (2 + 4)  # 4096 rows (the GPU floor): bf16 logits and their fp32 copy
    assert act.head == kept + chunk + V * D * 2  # + the bf16 product added into the fp32 accumulator
    assert act.head < tokens * 12 * V / 2  # materialized fp32 logits would take more than twice that
    capped = activation_bytes(replace(model, logit_softcap=30.0), 4, 2048, "bf16", checkpointing=False)
    assert capped.head == act.head + 4096 * V * 4  # the soft-cap's fp32 buffer


def test_max_micro_batch_fits_and_one_more_does_not():
    memory = {"train__seq_len": 1024, "plan__gpu_memory_gb": 24.0, "plan__world_size": 2}
    best = plan_for("gpt2_124m", **memory).max_micro_batch
    assert best >= 2
    assert plan_for("gpt2_124m", **memory, train__micro_batch_size=best).fits
    assert not plan_for("gpt2_124m", **memory, train__micro_batch_size=best + 1).fits


def test_a_model_whose_states_do_not_fit_gets_zero_and_a_hint():
    plan = plan_for("llama3_8b", deepspeed__zero_stage=0, plan__world_size=1)
    assert plan.model_state_gb_per_gpu > 80 and not plan.fits
    assert plan.max_micro_batch == 0
    assert "deepspeed.zero_stage=1" in plan.hint and "plan.world_size" in plan.hint


def test_auto_precision_is_planned_as_bf16():
    auto = plan_for("tiny", train__precision="auto")  # set past validation: the schema may not have it yet
    assert auto == plan_for("tiny", train__precision="bf16")
    assert auto != plan_for("tiny", train__precision="fp32")


def test_cli_json_is_one_object_with_the_required_keys(capsys):
    assert main(["plan", "model=tiny", "train.seq_len=256", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    required = {"params", "model_state_gb_per_gpu", "activation_gb_per_gpu", "total_gb_per_gpu", "fits"}
    assert required | {"max_micro_batch"} <= set(plan)
    assert (
        plan["params"]["total"]
        == count_parameters(replace(load_config(["model=tiny"]).model, vocab_size=8192)).total
    )
    assert plan["fits"] is True and plan["max_micro_batch"] > 8


def test_cli_table_states_its_unit(capsys):
    assert main(["plan", "model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "GB = 10^9 bytes" in out and "largest micro batch that fits" in out


def test_cli_bad_value_is_one_line_naming_the_key(capsys):
    assert main(["plan", "plan.world_size=0", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "plan.world_size" in captured.err
