"""The DeepSpeed config generated from ours, and the errors for settings that cannot work together."""

from __future__ import annotations

import pytest

from llmtrain.config import load_config
from llmtrain.distributed import runtime
from llmtrain.distributed.ds_config import build_ds_config, deep_merge, offloads_optimizer
from llmtrain.errors import ConfigError


def make(*overrides: str):
    return load_config(["debug=cpu", *overrides])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_batch_layout_and_zero_stage(stage):
    cfg = make(
        f"deepspeed.zero_stage={stage}",
        "train.micro_batch_size=4",
        "train.global_batch_size=32",
        "train.grad_clip=0.5",
    )
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["steps_per_print"] > 10**9 and ds["wall_clock_breakdown"] is False
    assert ds["checkpoint"] == {"load_universal": False}


def test_precision_and_loss_scaling():
    ds = build_ds_config(
        make("train.precision=fp16", "deepspeed.loss_scale_window=200", "deepspeed.initial_scale_power=12"), 1
    )
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["fp16"]["loss_scale"] == 0  # dynamic
    assert ds["fp16"]["loss_scale_window"] == 200 and ds["fp16"]["initial_scale_power"] == 12
    ds = build_ds_config(make("train.precision=bf16"), 1)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    ds = build_ds_config(make("train.precision=fp32"), 1)
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
NEOVERSE_V2 = "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not runtime.cpu_has_native_bf16(EPYC)
    assert runtime.cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert runtime.cpu_has_native_bf16(NEOVERSE_V2)
    assert not runtime.cpu_has_native_bf16("")


def test_auto_precision_follows_the_device(monkeypatch):
    assert make().train.precision == "fp32"  # debug=cpu sets it; the default is auto
    assert load_config([]).train.precision == "auto"
    real = runtime.cpu_has_native_bf16
    monkeypatch.setattr(runtime, "has_gpu", lambda: False)
    for flags, expected in ((EPYC, "fp32"), (SAPPHIRE_RAPIDS, "bf16")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda flags=flags: real(flags))
        precision, why = runtime.resolve_precision("auto")
        assert precision == expected and why.startswith("auto: this CPU")
        ds = build_ds_config(make("train.precision=auto"), 1)
        assert ds["bf16"]["enabled"] is (expected == "bf16") and not ds["fp16"]["enabled"]
    assert runtime.resolve_precision("bf16") == ("bf16", "as set")


def test_offload_settings():
    ds = build_ds_config(make("deepspeed=zero3_offload"), 2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert offloads_optimizer(ds)
    assert not offloads_optimizer(build_ds_config(make("deepspeed=zero2"), 2))


def test_raw_block_is_deep_merged_over_the_generated_config():
    cfg = make(
        "deepspeed=zero2",
        "+deepspeed.config.zero_optimization.reduce_bucket_size=1234",
        "+deepspeed.config.flops_profiler.enabled=true",
    )
    ds = build_ds_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == 2  # kept beside the raw key
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234
    assert ds["flops_profiler"] == {"enabled": True}


def test_deep_merge_leaves_inputs_alone():
    base, over = {"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}
    assert deep_merge(base, over) == {"a": {"b": 3, "c": 2}}
    assert base == {"a": {"b": 1, "c": 2}} and over == {"a": {"b": 3}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.micro_batch_size=4", "train.global_batch_size=12"], "train.global_batch_size=12"),
        (["+deepspeed.config.train_batch_size=99"], "deepspeed.config.train_batch_size"),
        (["+deepspeed.config.gradient_accumulation_steps=7"], "deepspeed.config.gradient_accumulation_steps"),
        (["+deepspeed.config.optimizer.type=Adam"], "deepspeed.config.optimizer"),
        (["+deepspeed.config.scheduler.type=WarmupLR"], "deepspeed.config.scheduler"),
        (["train.precision=bf16", "+deepspeed.config.fp16.enabled=true"], "bf16 and fp16"),
        (
            ["deepspeed.zero_stage=1", "+deepspeed.config.zero_optimization.offload_param.device=cpu"],
            "offload_param needs stage 3",
        ),
    ],
)
def test_inconsistent_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_ds_config(make(*overrides), world_size=2)
