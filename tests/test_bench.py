"""The benchmark suite of bench/: throughput.py through the real trainer on CPU, gpu_check.sh's dry
run, and vs_nanogpt.py's argument checks. Each script runs as a user runs it, in a child process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.config import load_config
from llmtrain.model.flops import flops_per_token

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TINY = ["model=tiny", "train.seq_len=32", "train.micro_batch_size=4"]
PEAK_TFLOPS = 0.5


def run(cmd: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ throughput.py


@pytest.fixture(scope="module")
def sweep(prepared_data, tmp_path_factory):
    """tiny on CPU at ZeRO-0 and ZeRO-1, then a configuration that cannot compose."""
    out = tmp_path_factory.mktemp("throughput") / "tp.json"
    proc = run(
        [
            sys.executable,
            str(BENCH / "throughput.py"),
            f"--data-dir={prepared_data.data_dir}",
            "--warmup=1",
            "--steps=3",
            f"--peak-tflops={PEAK_TFLOPS}",
            f"--out={out}",
            *TINY,
            "--sweep=deepspeed.zero_stage=0",
            "--sweep=deepspeed.zero_stage=1",
            "--sweep=model.n_heads=3",
        ]
    )
    return proc, json.loads(out.read_text())


def test_throughput_measures_each_configuration_through_the_trainer(sweep, prepared_data):
    proc, report = sweep
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert [r["zero_stage"] for r in ok] == [0, 1], proc.stderr[-3000:]
    cfg = load_config([*prepared_data.overrides, *TINY]).model
    cfg.vocab_size = prepared_data.vocab_size
    for r in ok:
        assert r["device"] == "cpu" and r["world_size"] == 1 and r["precision"] == "fp32"
        assert r["vocab_size"] == prepared_data.vocab_size and r["seq_len"] == 32
        assert r["timed_steps"] == 3 and len(r["step_times_s"]) == 3
        st = r["step_time_s"]
        assert 0 < st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
        assert r["tokens_per_s_per_device"] == pytest.approx(4 * 32 / st["median"])
        assert (
            r["tokens_per_s_per_device_min"]
            <= r["tokens_per_s_per_device"]
            <= r["tokens_per_s_per_device_max"]
        )
        assert r["flops_per_token"] == flops_per_token(cfg, 32)
        assert r["mfu"] == pytest.approx(
            r["tokens_per_s_per_device"] * r["flops_per_token"] / (PEAK_TFLOPS * 1e12)
        )
        assert r["memory_kind"] == "cpu_vmhwm_process" and r["memory_gb"] > 0
    # the trainer really ran: its metrics came from the DeepSpeed engine's loop
    assert "step 5/5" in proc.stderr
    assert report["machine"]["cpu_count"] >= 1 and report["warmup"] == 1


def test_throughput_reports_a_failed_configuration_and_runs_the_others(sweep):
    proc, report = sweep
    assert proc.returncode == 1  # not every configuration measured
    failed = report["results"][2]
    assert failed["status"] == "error" and "model.n_heads" in failed["error"]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"common overrides: {' '.join(TINY)}"
    assert [ln.split()[0] for ln in lines[3:]] == [
        "deepspeed.zero_stage=0",
        "deepspeed.zero_stage=1",
        "model.n_heads=3",
    ]
    assert "VmHWM" in lines[3] and "FAILED" in lines[5]


def test_throughput_refuses_a_folder_that_is_not_prepared(tmp_path):
    proc = run([sys.executable, str(BENCH / "throughput.py"), f"--data-dir={tmp_path}", *TINY])
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("not a prepared data folder (llmtrain prepare)")


# ------------------------------------------------------------------------------ gpu_check.sh


def test_gpu_check_is_valid_bash():
    assert run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


def test_gpu_check_dry_run_prints_the_commands_for_both_presets(tmp_path):
    proc = run(["bash", str(BENCH / "gpu_check.sh")], DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: 0 problem(s)" in proc.stdout
    benches = [ln for ln in proc.stdout.splitlines() if "bench/throughput.py" in ln]
    assert any("model=llama_125m" in ln and "train.seq_len=1024" in ln for ln in benches)
    assert any("model=llama_1b" in ln and "train.seq_len=4096" in ln for ln in benches)
    assert all("train.precision=bf16" in ln for ln in benches)
    assert "pytest" in proc.stdout and "tests/kernels/triton_cases.py" in proc.stdout
    assert not list(tmp_path.glob("*.json")), "a dry run must not run a benchmark"


def test_gpu_check_dry_run_names_what_is_missing(tmp_path):
    tree = tmp_path / "checkout"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_check.sh", tree / "bench")
    proc = run(
        ["bash", str(tree / "bench" / "gpu_check.sh")], DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path)
    )
    assert proc.returncode == 1
    assert "MISSING: configs/model/llama_1b.yaml" in proc.stdout
    assert "MISSING: bench/throughput.py" in proc.stdout


# ------------------------------------------------------------------------------ vs_nanogpt.py


@pytest.mark.parametrize("args", [[], ["--nanogpt=/no/such/nanoGPT"]], ids=["no flag", "no checkout"])
def test_vs_nanogpt_without_a_checkout_says_so_in_one_line(args, tmp_path):
    proc = run([sys.executable, str(BENCH / "vs_nanogpt.py"), *args])
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vs_nanogpt: --nanogpt")
    assert "nanoGPT checkout" in lines[0]


def test_vs_nanogpt_rejects_a_folder_without_train_py(tmp_path):
    (tmp_path / "model.py").write_text("")
    proc = run([sys.executable, str(BENCH / "vs_nanogpt.py"), f"--nanogpt={tmp_path}"])
    assert proc.returncode == 2 and "train.py and model.py not found" in proc.stderr


# ---------------------------------------------------------------------------- bench_options.py


def test_bench_options_times_each_variant_against_the_first():
    proc = run(
        [sys.executable, str(BENCH / "bench_options.py"), "--variants", "llama,modern", "--rounds", "1"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"llama", "modern"}
    assert float(rows["llama"][2]) == 1.0 and float(rows["modern"][0]) > 0


def test_bench_options_names_an_unknown_variant():
    proc = run([sys.executable, str(BENCH / "bench_options.py"), "--variants", "llama,nope"])
    assert proc.returncode == 1 and "unknown variant(s) nope" in proc.stderr
