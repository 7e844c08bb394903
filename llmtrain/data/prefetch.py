"""The train loader read ahead on a background thread, into pinned memory when the device is a GPU.

Reading a micro-batch (index arithmetic, gathers from memory-mapped shards, the token-id check) takes
host time that the step would otherwise wait for; pinned memory lets `.to(device, non_blocking=True)`
return at once instead of copying synchronously. The sequence of batches is exactly the loader's:
the thread reads the samples the loader will hand out next, in order, and the loader's own position
advances only as batches are taken, so `state_dict()` (what a checkpoint saves) counts what training
consumed, never what was read ahead. An error while reading (a corrupt shard) is raised by the
`next_batch()` call that would have read that batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

from llmtrain.data.loader import Batch, TrainLoader

_STOP_POLL_S = 0.1


class Prefetcher:
    """`next_batch()`, `state_dict()`, `load_state_dict()` of a `TrainLoader`, `depth` batches ahead."""

    def __init__(self, loader: TrainLoader, *, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet
            raise AttributeError(name)
        return getattr(self.loader, name)  # grad_accum_steps, source_names, next_sample, ...

    def next_batch(self) -> Batch:
        if self._thread is None:
            self._start()
        expected = self.loader.advance()
        first, item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if first != int(expected[0]):
            raise RuntimeError(
                f"prefetch out of order: read sample {first}, the loader is at {int(expected[0])}"
            )
        return item

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move the loader (a resume, a rollback): what was read ahead is dropped."""
        self.close()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting for room
                self._queue.get(timeout=_STOP_POLL_S)
        self._thread = self._queue = self._stop = None

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce,
            args=(self.loader.position, self._queue, self._stop),
            name="llmtrain-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _produce(self, position: tuple[int, int], out: queue.Queue, stop: threading.Event) -> None:
        loader = self.loader
        step_start, micro = position
        accum = loader.grad_accum_steps
        while not stop.is_set():
            ks = loader.samples_of(step_start, micro)
            micro += 1
            if micro == accum:
                step_start, micro = step_start + loader.global_batch_size, 0
            try:
                item: Batch | BaseException = (
                    _pinned(loader.read_samples(ks)) if self.pin_memory else loader.read_samples(ks)
                )
            except BaseException as err:  # handed to the consumer, at the batch that failed
                item = err
            if not _put(out, (int(ks[0]), item), stop) or isinstance(item, BaseException):
                return


def _pinned(batch: Batch) -> Batch:
    return {key: tensor.pin_memory() for key, tensor in batch.items()}


def _put(out: queue.Queue, item: tuple[int, Any], stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_STOP_POLL_S)
            return True
        except queue.Full:
            continue
    return False
