"""The datatrove stages of one source's clean stage, how they run (local, SLURM, Ray) and what they counted.

    filter        T tasks   read -> length -> language -> quality filters (in `clean.filters` order)
                            -> decontamination -> write [-> first dedup signature]
    exact_find    1 task    duplicate hashes across all tasks          (dedup: exact | both)
    exact_filter  T tasks   drop them -> write [-> MinHash signature]
    near_buckets  B tasks   one per LSH band: candidate pairs          (dedup: near | both)
    near_cluster  1 task    union-find over the pairs: one kept per cluster
    near_filter   T tasks   drop the others -> write

Imported only when cleaning is on (it imports datatrove).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig as DtExactDedupConfig
from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

from llmtrain.data import clean_steps as steps
from llmtrain.data.clean_state import SUBMITTED_FILE, CleanPending, CleanResult, read_json
from llmtrain.data.config import CleanConfig, SourceConfig
from llmtrain.errors import ConfigError, DataError, UserError


@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int
    roles: list[str]
    """What each step is, for the counts: read, write, sig, or the stage / filter it removes for."""
    dir: Path


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


def lsh_bands(threshold: float, num_hashes: int) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_hashes whose S-curve 1-(1-s^rows)^bands best separates
    similarities below and above `threshold` (least area of false positives plus false negatives)."""
    best, best_err = (1, num_hashes), float("inf")
    s = np.linspace(0, 1, 401)
    for bands in range(1, num_hashes + 1):
        rows = num_hashes // bands
        p = 1 - (1 - s**rows) ** bands
        err = _trapezoid(np.where(s < threshold, p, 1 - p), s)
        if err < best_err - 1e-12:
            best, best_err = (bands, rows), err
    return best


def minhash_config(clean: CleanConfig) -> MinhashConfig:
    near = clean.near
    bands, rows = near.num_buckets, near.hashes_per_bucket
    if near.threshold is not None:
        bands, rows = lsh_bands(near.threshold, bands * rows)
    return MinhashConfig(n_grams=near.n_grams, num_buckets=bands, hashes_per_bucket=rows, seed=near.seed)


def _quality_filter(name: str, clean: CleanConfig):
    if name == "gopher_quality":
        g = clean.gopher_quality
        return GopherQualityFilter(
            min_doc_words=g.min_doc_words,
            max_doc_words=g.max_doc_words,
            min_avg_word_length=g.min_avg_word_length,
            max_avg_word_length=g.max_avg_word_length,
            max_symbol_word_ratio=g.max_symbol_word_ratio,
            max_bullet_lines_ratio=g.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=g.min_alpha_words_ratio,
            min_stop_words=g.min_stop_words,
            stop_words=list(g.stop_words),
            language=steps.WORDS,
        )
    if name == "gopher_repetition":
        r = clean.gopher_repetition
        top = tuple((n, getattr(r, f"top_{n}_gram_frac")) for n in (2, 3, 4))
        dup = tuple((n, getattr(r, f"dup_{n}_gram_frac")) for n in range(5, 11))
        return GopherRepetitionFilter(
            dup_line_frac=r.dup_line_frac,
            dup_para_frac=r.dup_para_frac,
            dup_line_char_frac=r.dup_line_char_frac,
            dup_para_char_frac=r.dup_para_char_frac,
            top_n_grams=tuple((n, f) for n, f in top if f is not None),
            dup_n_grams=tuple((n, f) for n, f in dup if f is not None),
            language=steps.WORDS,
        )
    if name == "c4":
        c = clean.c4
        return steps.KeepTextC4Filter(
            remove_lines=c.remove_lines,
            split_paragraph=c.split_paragraph,
            remove_citations=c.remove_citations,
            filter_no_terminal_punct=c.filter_no_terminal_punct,
            min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line,
            max_word_length=c.max_word_length,
            filter_lorem_ipsum=c.filter_lorem_ipsum,
            filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket,
            filter_policy=c.filter_policy,
            language=steps.WORDS,
        )
    f = clean.fineweb
    return FineWebQualityFilter(
        line_punct_thr=f.line_punct_thr,
        line_punct_exclude_zero=f.line_punct_exclude_zero,
        short_line_thr=f.short_line_thr,
        short_line_length=f.short_line_length,
        char_duplicates_ratio=f.char_duplicates_ratio,
        new_line_ratio=f.new_line_ratio,
        language=steps.WORDS,
    )


def build_stages(
    src: SourceConfig,
    clean: CleanConfig,
    root: Path,
    blocks: list[list[str]],
    on_bad_record: str,
    folder: Path,
) -> list[Stage]:
    work, kept, tasks = folder / "work", str(folder / "kept"), len(blocks)
    exact, near = clean.dedup in ("exact", "both"), clean.dedup in ("near", "both")
    mh = minhash_config(clean) if near else None
    ex = DtExactDedupConfig(content_getter=steps.normalized_text if clean.exact.normalize else steps.raw_text)
    stages: list[Stage] = []

    def stage(name: str, pipeline: list, roles: list[str], n: int = tasks) -> None:
        stages.append(Stage(name, pipeline, n, roles, folder / "stages" / f"{len(stages)}_{name}"))

    pipe = [steps.SourceReader(src, str(root), blocks, on_bad_record)]
    roles = ["read"]
    if clean.min_chars > 0 or clean.max_chars is not None:
        pipe.append(steps.LengthFilter(clean.min_chars, clean.max_chars))
        roles.append("length")
    if clean.language.languages:
        lang = clean.language
        if not Path(lang.model).expanduser().is_file():
            raise UserError(f"data.clean.language.model: {lang.model} is not a file (a local fastText model)")
        pipe.append(
            steps.FastTextLanguageFilter(str(Path(lang.model).expanduser()), lang.languages, lang.min_score)
        )
        roles.append("language")
    for name in clean.filters:
        pipe.append(_quality_filter(name, clean))
        roles.append(name)
    if clean.decontaminate:
        config = NGramsDecontConfig(n_grams=clean.decont.n_grams)
        pipe.append(NGramsDecontFilter(str(folder / "decont_index"), config=config, language=steps.WORDS))
        roles.append("decontaminate")
    out = kept if not (exact or near) else str(work / "filtered")
    pipe.append(steps.ShardWriter(out))
    roles.append("write")
    if exact:
        pipe.append(ExactDedupSignature(str(work / "exact_sigs"), config=ex))
    elif near:
        pipe.append(MinhashDedupSignature(str(work / "minhash_sigs"), config=mh, language=steps.WORDS))
    stage("filter", pipe, roles + (["sig"] if exact or near else []))
    if exact:
        stage(
            "exact_find",
            [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=ex)],
            ["find"],
            1,
        )
        prev, out = out, kept if not near else str(work / "exact")
        pipe = [
            steps.ShardReader(prev),
            ExactDedupFilter(str(work / "exact_dups"), config=ex),
            steps.ShardWriter(out),
        ]
        roles = ["reread", "exact_dedup", "write"]
        if near:
            pipe.append(MinhashDedupSignature(str(work / "minhash_sigs"), config=mh, language=steps.WORDS))
            roles.append("sig")
        stage("exact_filter", pipe, roles)
    if near:
        buckets = MinhashDedupBuckets(str(work / "minhash_sigs"), str(work / "minhash_buckets"), config=mh)
        stage("near_buckets", [buckets], ["find"], mh.num_buckets)
        cluster = MinhashDedupCluster(str(work / "minhash_buckets"), str(work / "minhash_remove"), config=mh)
        stage("near_cluster", [cluster], ["find"], 1)
        pipe = [
            steps.ShardReader(out),
            MinhashDedupFilter(str(work / "minhash_remove")),
            steps.ShardWriter(kept),
        ]
        stage("near_filter", pipe, ["reread", "near_dedup", "write"])
    return stages


def _completed(stage: Stage) -> int:
    done = stage.dir / "completions"
    return sum(1 for r in range(stage.tasks) if (done / f"{r:05d}").is_file())


def run_stages(cfg, name: str, stages: list[Stage], workers: int, folder: Path) -> None:
    steps.quiet_console()
    executor = cfg.prepare.executor
    if executor == "slurm":
        _run_slurm(cfg, name, stages, folder)
        return
    if executor == "ray":
        if any(_completed(s) < s.tasks for s in stages):
            with ray_runtime(cfg.prepare.ray, workers):
                _run_local_or_ray(cfg, name, stages, workers)
        return
    _run_local_or_ray(cfg, name, stages, workers)


def _run_local_or_ray(cfg, name: str, stages: list[Stage], workers: int) -> None:
    executor = cfg.prepare.executor
    for stage in stages:
        if _completed(stage) == stage.tasks:
            continue
        t0 = time.perf_counter()
        if executor == "ray":
            run = _ray_executor(cfg.prepare.ray, stage)
        else:
            _preload_workers()
            run = steps.LocalExecutor(
                stage.pipeline,
                tasks=stage.tasks,
                workers=min(workers, stage.tasks),
                logging_dir=str(stage.dir),
            )
        run.run()
        if executor == "ray":
            _raise_failed_ray_task(name, stage)
        if cfg.prepare.progress:
            print(
                f"clean {name}: {stage.name} ({stage.tasks} tasks) {time.perf_counter() - t0:.1f} s",
                flush=True,
            )


def _preload_workers() -> None:
    """Worker processes fork from datatrove's forkserver: let it import this pipeline's modules once,
    rather than every worker of every stage importing datatrove anew."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload(["llmtrain.data.clean_pipeline"])


@contextlib.contextmanager
def ray_runtime(r, workers: int):
    """Ray for the clean stage: the cluster at `prepare.ray.address`, or (unset) a private local
    runtime of `workers` CPUs, with no dashboard, no usage reporting and its files in a fresh /tmp
    folder, shut down and removed afterwards. A Ray session already open in this process is used."""
    try:
        import ray
    except ImportError:
        raise UserError("prepare.executor=ray needs Ray: pip install -e .[ray]") from None
    if ray.is_initialized():
        yield
        return
    temp = None
    if r.address is None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray would otherwise report usage over the network
        cpus = max(workers, r.cpus_per_task)
        # a short path: Ray's sockets live under it (unix socket paths are limited to ~107 bytes)
        temp = tempfile.mkdtemp(prefix="llmtrain-ray-", dir="/tmp")
        ray.init(
            address="local",  # never attach to another Ray instance on this machine (or RAY_ADDRESS)
            num_cpus=cpus,
            num_gpus=0,
            # as much reservable memory as `cpus` tasks ask for, so the reservation never blocks here
            _memory=int(cpus * r.mem_per_cpu_gb * 2**30),
            object_store_memory=128 * 2**20,  # it only carries the pickled executor to the tasks
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=temp,
            # datatrove's Ray tasks write their logs under the temp dir first: keep them in ours
            runtime_env={"env_vars": {"TMPDIR": temp}},
        )
    else:
        ray.init(address=r.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _ray_executor(r, stage: Stage):
    from loguru import logger

    if r.address is None:  # its warning that logging_dir must be shared: one machine shares it
        logger.disable("datatrove.executor.ray")
    try:
        return steps.RayExecutor(
            stage.pipeline,
            tasks=stage.tasks,
            workers=-1,
            logging_dir=str(stage.dir),
            cpus_per_task=r.cpus_per_task,
            mem_per_cpu_gb=r.mem_per_cpu_gb,
        )
    finally:
        logger.enable("datatrove.executor.ray")


def _raise_failed_ray_task(name: str, stage: Stage) -> None:
    """datatrove's Ray executor returns after failed tasks: raise the first failure as the local
    executor would (an llmtrain error keeps its class and one-line message)."""
    done = stage.dir / "completions"
    failed = [r for r in range(stage.tasks) if not (done / f"{r:05d}").is_file()]
    if not failed:
        return
    rank = failed[0]
    error = read_json(stage.dir / steps.RAY_ERRORS / f"{rank:05d}.json") or {}
    kind, message = error.get("type", ""), error.get("message", "")
    known = {f"{c.__module__}.{c.__qualname__}": c for c in (UserError, ConfigError, DataError)}
    if kind in known:
        raise known[kind](message)
    why = f"{kind.rsplit('.', 1)[-1]}: {message}" if kind else "its Ray worker stopped"
    raise UserError(
        f"clean {name}: stage {stage.name}: {len(failed)} of {stage.tasks} Ray tasks failed, task {rank}: "
        f"{why} (log: {stage.dir / 'logs' / f'task_{rank:05d}.log'}); rerun to retry the unfinished tasks"
    )


def _run_slurm(cfg, name: str, stages: list[Stage], folder: Path) -> None:
    """Submit the stages as dependent job arrays once; later runs only report on them until they finish."""
    if all(_completed(s) == s.tasks for s in stages):
        return
    submitted = folder / SUBMITTED_FILE
    if submitted.is_file():
        left = next(s for s in stages if _completed(s) < s.tasks)
        jobs = json.loads(submitted.read_text()).get("jobs", [])
        raise CleanPending(
            f"clean {name}: SLURM jobs {', '.join(map(str, jobs))} have not finished (stage {left.name}: "
            f"{_completed(left)}/{left.tasks} tasks done); rerun `llmtrain prepare` when they have, or delete "
            f"{submitted} to submit the unfinished tasks again"
        )
    executors = slurm_executors(cfg, name, stages)
    if shutil.which("sbatch") is None:
        raise UserError(
            "prepare.executor=slurm: `sbatch` is not on PATH; run llmtrain prepare on a SLURM login node"
        )
    executors[-1].launch_job()
    jobs = [e.job_id for e in executors if e.job_id not in (None, -1)]
    submitted.write_text(json.dumps({"jobs": jobs, "time": time.time()}) + "\n")
    raise CleanPending(
        f"clean {name}: submitted SLURM jobs {', '.join(map(str, jobs))} (scripts in {folder / 'stages'}); "
        "rerun `llmtrain prepare` with the same settings when they have finished to tokenize"
    )


def slurm_executors(cfg, name: str, stages: list[Stage]) -> list:
    """One SLURM job array per stage, each depending on the one before."""
    s = cfg.prepare.slurm
    out, prev = [], None
    for stage in stages:
        prev = steps.SlurmExecutor(
            stage.pipeline,
            tasks=stage.tasks,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb,
            workers=s.max_concurrent or -1,
            job_name=f"{s.job_name}-{name}-{stage.name}",
            qos=s.qos,
            env_command=s.env_command,
            sbatch_args=dict(s.sbatch_args),
            depends=prev,
            logging_dir=str(stage.dir),
            requeue_signals=None,
            mail_type="NONE",
        )
        out.append(prev)
    return out


def _stat(stats: dict, label: str) -> int:
    value = stats.get(label, 0)
    return int(value["total"] if isinstance(value, dict) else value)


def collect(name: str, stages: list[Stage], tasks: int) -> CleanResult:
    """Sum datatrove's per-task stats files into the counts of the report."""
    res = CleanResult(name, tasks=tasks)
    for stage in stages:
        for rank in range(stage.tasks):
            path = stage.dir / "stats" / f"{rank:05d}.json"
            step_stats = json.loads(path.read_text()) if path.is_file() else []
            for role, step in zip(stage.roles, step_stats):
                stats = step.get("stats", {})
                if role == "read":
                    res.docs_in += _stat(stats, "docs_in")
                    res.chars_in += _stat(stats, "chars_in")
                    res.skipped_records += _stat(stats, "skipped_records")
                elif role == "write" and stage is stages[-1]:
                    res.docs_out += _stat(stats, "docs_out")
                    res.chars_out += _stat(stats, "chars_out")
                elif role == "decontaminate":
                    for label in stats:
                        if label.startswith("contaminated_") and not label.startswith("contaminated_tg_"):
                            task = "decontaminate:" + label.removeprefix("contaminated_")
                            res.removed[task] = res.removed.get(task, 0) + _stat(stats, label)
                elif role not in ("write", "sig", "find", "reread"):
                    res.removed[role] = res.removed.get(role, 0) + _stat(stats, "dropped")
                    for label in stats:
                        if label.startswith("dropped_"):
                            why = res.reasons.setdefault(role, {})
                            key = label.removeprefix("dropped_")
                            why[key] = why.get(key, 0) + _stat(stats, label)
    if res.docs_in - sum(res.removed.values()) != res.docs_out:
        raise UserError(
            f"clean {name}: counts do not add up ({res.docs_in} in, {res.removed} removed, {res.docs_out} out); "
            f"delete {stages[0].dir.parent.parent} to clean this source again"
        )
    return res
