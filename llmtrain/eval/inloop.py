"""Downstream evaluation during training (`train.eval_tasks`, every `train.eval_every` steps).

The tasks are resolved once, when training starts (an unknown name or a bad JSONL line stops the run
before its first step). Each interval every rank scores its share of the documents through the
training backend's forward (lm-eval's own data-parallel split; the adapter keeps the ranks' forwards
in step, as ZeRO-3 needs), rank 0 combines them, and the random generators are left as they were so
the training run continues exactly as without evaluation.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch


class InLoopEval:
    def __init__(self, cfg, tokenizer, device: torch.device):
        from llmtrain.eval.tasks import plan_tasks

        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        ev = cfg.eval
        self.plan = plan_tasks(
            list(cfg.train.eval_tasks), ev.include_path, registry=ev.registry, key="train.eval_tasks"
        )
        self._check_documents()

    def _check_documents(self) -> None:
        """Every rank needs a document of every task: a rank without one would skip a collective the
        others enter (lm-eval splits documents across ranks, rank r taking r, r + world, ...)."""
        import torch.distributed as dist

        from llmtrain.errors import ConfigError

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return
        limit = self.cfg.eval.limit
        for name, task in self.plan.manager.load(list(self.plan.specs))["tasks"].items():
            docs = len(task.eval_docs)
            used = docs if limit is None else min(docs, math.ceil(docs * limit) if limit < 1 else int(limit))
            if used < world:
                raise ConfigError(
                    f"train.eval_tasks: {name} evaluates {used} document(s) (eval.limit={limit}), fewer than "
                    f"the {world} ranks that share them; raise eval.limit or evaluate it offline"
                )

    def run(self, backend) -> dict[str, float] | None:
        """{"eval/<task>/<metric>": value, "eval_s": seconds} on rank 0, None on the others."""
        from llmtrain.eval.lm_adapter import LlmtrainLM
        from llmtrain.eval.tasks import flat_metrics, run

        ev = self.cfg.eval
        t0 = time.perf_counter()
        lm = LlmtrainLM.from_backend(
            backend,
            self.cfg.model,
            self.tokenizer,
            self.device,
            batch_size=ev.batch_size or ev.micro_batch_size,
            max_gen_toks=ev.max_gen_toks,
        )
        states = _rng_states()
        was_training = backend.training
        backend.eval()
        try:
            results = run(
                lm,
                self.plan,
                limit=ev.limit,
                num_fewshot=ev.num_fewshot,
                bootstrap_iters=0,  # stderr by resampling is offline work
                log_samples=False,
                seed=False,
            )
        finally:
            backend.train(was_training)
            _restore_rng(states)
        if results is None:
            return None
        record = flat_metrics(results)
        record["eval_s"] = time.perf_counter() - t0
        record["eval_forwards"] = lm.forwards
        return record


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
