"""Clipping and the non-finite skip inside torch's fused AdamW (llmtrain.distributed.device_step)."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.config import load_config
from llmtrain.distributed.device_step import DeviceStep, module_grad_norm
from llmtrain.distributed.ds_config import build_ds_config, can_step_on_device
from llmtrain.train.metrics import read_metrics


def _optimizer(fused: bool = True):
    torch.manual_seed(0)
    decay, plain = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [decay], "weight_decay": 0.1}, {"params": [plain], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=fused), (decay, plain)


def _set_grads(params, norm: float) -> None:
    """Gradients of global norm `norm`, in the same direction each time."""
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, i + 1.0) + torch.linspace(-1, 1, p.numel()).reshape(p.shape)
    total = _norm(params)
    for p in params:
        p.grad.mul_(norm / total)


def _norm(params) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


@pytest.mark.parametrize("norms", [(0.3, 0.5, 0.2), (0.5, 3.0, 1.5, 0.8)])  # under the clip; mixed
def test_a_clipped_update_is_the_one_deepspeed_makes(norms):
    """Steps clipped by different factors (a factor common to every step Adam would cancel)."""
    clip = 1.0
    ours, ours_params = _optimizer()
    theirs, their_params = _optimizer(fused=False)
    unclipped, unclipped_params = _optimizer(fused=False)
    step = DeviceStep(ours, clip, lambda: _norm(ours_params))
    for norm in norms:
        _set_grads(ours_params, norm)
        _set_grads(their_params, norm)
        _set_grads(unclipped_params, norm)
        unclipped.step()
        before = _norm(ours_params)
        step.begin()
        ours.step()
        assert step.norm.item() == pytest.approx(before.item())
        # DeepSpeed's ZeRO 1/2 clip (unscale_and_clip_grads): grad *= 1 / max(1, (norm + 1e-6) / clip)
        factor = torch.clamp((_norm(their_params) + 1e-6) / clip, min=1.0)
        for p in their_params:
            p.grad.mul_(1.0 / factor)
        theirs.step()
        assert step.found_inf.item() == 0.0
    for a, b, c in zip(ours_params, their_params, unclipped_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(b, c) == (max(norms) < clip)  # the mixed case really clipped


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_leaves_weights_moments_and_step_count_as_they_were(bad):
    optimizer, params = _optimizer()
    step = DeviceStep(optimizer, 1.0, lambda: _norm(params))
    _set_grads(params, 1.0)
    step.begin()
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    _set_grads(params, 1.0)
    params[1].grad[0] = bad
    step.begin()
    optimizer.step()
    assert step.found_inf.item() == 1.0 and not torch.isfinite(step.norm)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    for key, value in optimizer.state[params[0]].items():
        assert torch.equal(value, state[key]), key
    _set_grads(params, 1.0)  # the next finite step applies again
    step.begin()
    optimizer.step()
    assert step.found_inf.item() == 0.0 and not torch.equal(params[0].detach(), before[0])
    assert optimizer.state[params[0]]["step"].item() == 2


def test_the_norm_is_read_once_per_step_across_partition_groups():
    """ZeRO 1/2 step the optimizer once per parameter group: each call uses the same factor."""
    optimizer, params = _optimizer()
    reads = []
    step = DeviceStep(optimizer, 1.0, lambda: reads.append(1) or _norm(params))
    _set_grads(params, 1.0)
    step.begin()
    assert not step.armed
    groups = optimizer.param_groups
    for group in list(groups):  # as stage_1_and_2._optimizer_step does
        optimizer.param_groups = [group]
        optimizer.step()
    optimizer.param_groups = groups
    assert step.armed and len(reads) == 1


def test_only_a_fused_optimizer_is_accepted():
    optimizer, params = _optimizer(fused=False)
    with pytest.raises(ValueError, match="fused"):
        DeviceStep(optimizer, 1.0, lambda: _norm(params))


def test_module_grad_norm_counts_a_tied_weight_once():
    shared = torch.nn.Linear(3, 3, bias=False)
    model = torch.nn.ModuleDict({"a": shared, "b": shared})
    shared.weight.grad = torch.full((3, 3), 2.0)
    assert module_grad_norm(model, torch.device("cpu")).item() == pytest.approx(6.0)


@pytest.mark.parametrize(
    "overrides, on_device",
    [
        (["deepspeed=zero0", "train.precision=fp32"], True),
        (["deepspeed=zero1", "train.precision=bf16"], True),
        (["deepspeed=zero2", "train.precision=bf16"], True),
        (["deepspeed=zero1", "train.precision=fp32"], False),  # its step reads the norm whatever it is told
        (["deepspeed=zero0", "train.precision=bf16"], False),  # DeepSpeed's bf16 wrapper does too
        (["deepspeed=zero3", "train.precision=bf16"], False),
        (["deepspeed=zero1", "train.precision=fp16"], False),  # the loss scaler decides on the host
        (["deepspeed=zero1", "train.precision=bf16", "optim=muon", "train.grad_clip=0"], False),
        (["deepspeed=zero1", "train.precision=bf16", "train.step_on_device=false"], False),
        (["deepspeed=zero1", "train.precision=bf16", "+deepspeed.config.gradient_clipping=2.0"], False),
        (
            ["deepspeed=zero2", "train.precision=bf16", "+deepspeed.config.bf16.check_grad_overflow=true"],
            False,
        ),
    ],
)
def test_which_settings_step_on_device_and_what_deepspeed_is_told(overrides, on_device):
    cfg = load_config(["model=tiny", "train.grad_clip=0.5", *overrides])
    assert can_step_on_device(cfg, build_ds_config(cfg, 2)) is on_device
    ds = build_ds_config(cfg, 2, steps_on_device=on_device)
    if on_device:
        assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["check_grad_overflow"] is False
    else:
        assert ds["gradient_clipping"] == cfg.deepspeed.config.get("gradient_clipping", cfg.train.grad_clip)
        assert ds["bf16"]["check_grad_overflow"] is True


def _nan_on_rank1_run(runs, stage: int, precision: str, on_device: bool):
    """4 steps on 2 CPU ranks, rank 1's loss of step 2 NaN, logged every 2 steps: (losses, grad norms)."""
    from dist_jobs import check, deepspeed_job, grad_norms, losses

    run_dir = runs.root / f"nan_rank1_z{stage}_{precision}_{on_device}"
    overrides = runs.overrides(
        run_dir,
        f"deepspeed.zero_stage={stage}",
        f"train.precision={precision}",
        "train.grad_clip=1.0",
        "train.val_every=0",
        "train.max_steps=4",
        "logging.every_steps=2",  # the device's flags are read at steps 2 and 4
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        f"train.step_on_device={on_device}",
    )
    result = check(deepspeed_job(overrides, cwd=runs.root, LLMTRAIN_FAULT="loss@2:rank=1:nan"))
    where = "on the device" if on_device else "DeepSpeed's, on the host"
    assert f"clipping and non-finite skips: {where}" in result.stderr
    assert "step 2: non-finite gradient norm, update skipped" in result.stderr
    skipped = {r["step"]: r["skipped_steps"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}
    assert skipped == {2: 1, 4: 1}
    return losses(run_dir), grad_norms(run_dir)


def test_a_nan_on_one_rank_is_skipped_by_both_ranks(runs):
    """bf16 ZeRO-2: the all-reduced norm both ranks read is NaN, so both drop step 2's update. Had
    either applied it, its NaN partition would reach every rank with the all-gather and step 3 and
    4 would have no finite loss (checked: with found_inf forced to 0 they have none)."""
    losses, _ = _nan_on_rank1_run(runs, 2, "bf16", on_device=True)
    assert sorted(losses) == [2, 4] and all(math.isfinite(losses[s]) for s in (2, 4))  # 2: step 1's loss


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, precision, rel",
    [pytest.param(2, "bf16", 2e-3, id="zero2-bf16"), pytest.param(0, "fp32", 1e-5, id="zero0-fp32")],
)
def test_a_nan_on_one_rank_is_skipped_as_deepspeeds_host_check_skips_it(runs, stage, precision, rel):
    """The same fault with the host deciding (train.step_on_device=false): the same logged losses. At
    ZeRO-0 the norm both ranks share is that of the averaged gradients."""
    device, device_norms = _nan_on_rank1_run(runs, stage, precision, on_device=True)
    host, host_norms = _nan_on_rank1_run(runs, stage, precision, on_device=False)
    assert sorted(device) == sorted(host) == [2, 4]
    for step in (2, 4):
        assert device[step] == pytest.approx(host[step], rel=rel), step
    for norm in (device_norms[2], host_norms[2]):  # step 2's own norm: logged as null or non-finite
        assert norm is None or not math.isfinite(norm)
    assert device_norms[4] == pytest.approx(host_norms[4], rel=10 * rel)
