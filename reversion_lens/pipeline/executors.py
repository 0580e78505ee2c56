"""Executors run the runner's tasks; :class:`Progress` shows them.

An executor has ``map(fn, items, progress=None) -> list`` (results in item order). :class:`SerialExecutor`
runs in this process (notebooks, tests, debugging); :class:`LocalExecutor` in a pool of local processes
(``spawn``); :class:`reversion_lens.distributed.RayExecutor` on a Ray cluster. Tasks report what they
are doing through :func:`report` (a line such as ``"seed 2 grad:v_rev: step 40/100"``); a local pool
forwards those lines to the parent, whose :class:`Progress` shows one bar over the runs (done / total,
ETA, each worker's current task) on a terminal, and one line per finished run otherwise.
"""

import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol

__all__ = ["Executor", "SerialExecutor", "LocalExecutor", "Progress", "report"]

_CHANNEL: Any = None  # where report() sends status lines: a queue in pool workers, a Progress in-process


def report(text: str) -> None:
    """Tell the parent what this task is doing now (a no-op when nobody listens)."""
    channel = _CHANNEL
    if channel is None:
        return
    if isinstance(channel, Progress):
        channel.status(os.getpid(), text)
    else:
        try:
            channel.put_nowait((os.getpid(), text))
        except Exception:
            pass


class Progress:
    """Done / total over the runs, ETA, and each worker's current task.

    On a terminal (``stream.isatty()``) a single tqdm bar; elsewhere one line per finished run, so a log
    file or CI output shows steady progress.
    """

    def __init__(self, total: int, log: Callable[[str], None] | None = print, stream: Any = None):
        self.total, self.done = total, 0
        self.log = log or (lambda s: None)
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.workers: dict[int, str] = {}
        self._bar = None
        if total and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="runs", unit="run", file=self.stream, dynamic_ncols=True)

    def status(self, worker: int, text: str) -> None:
        self.workers[worker] = text
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(self.workers.values())[-160:], refresh=True)

    def finished(self, what: str) -> None:
        """A run ended (``what`` names it)."""
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        if self._bar is not None:
            self._bar.update(1)
            return
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"[{self.done}/{self.total}] {what} done ({_clock(elapsed)} elapsed, ETA {_clock(eta)})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Executor(Protocol):
    """Runs independent tasks: ``map(fn, items)`` returns the results in order."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: Progress | None = None) -> list[Any]: ...


def _finished(progress: Progress | None, item: Any) -> None:
    if progress is not None and getattr(item, "counts", True):
        progress.finished(str(item))


class SerialExecutor:
    """In this process, one task at a time (notebooks, tests, debugging)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: Progress | None = None) -> list[Any]:
        global _CHANNEL
        from ..io import torch_threads

        old, _CHANNEL = _CHANNEL, progress
        out = []
        try:
            with torch_threads(self.threads):
                for x in items:
                    out.append(fn(x))
                    _finished(progress, x)
        finally:
            _CHANNEL = old
        return out


def _init_worker(threads: int, channel: Any) -> None:
    global _CHANNEL
    import torch

    torch.set_num_threads(threads)
    _CHANNEL = channel


class LocalExecutor:
    """A pool of local processes (``spawn``), ``threads`` torch threads each.

    On a small machine one thread per process is several times faster than several threads per
    process (TOYWORLD.md): parallelise seeds and arms across processes instead.
    """

    def __init__(self, workers: int = 2, threads: int = 1):
        self.workers, self.threads = max(1, workers), threads

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: Progress | None = None) -> list[Any]:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return SerialExecutor(self.threads).map(fn, items, progress)
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        channel = ctx.Queue()
        results: dict[int, Any] = {}
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(self.threads, channel)) as pool:  # fmt: skip
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    _drain(channel, progress)
                    for f in done:
                        i = futures[f]
                        results[i] = f.result()  # a failed task raises here; the pool is shut down below
                        _finished(progress, items[i])
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        return [results[i] for i in range(len(items))]


def _drain(channel: Any, progress: Progress | None) -> None:
    import queue

    while True:
        try:
            worker, text = channel.get_nowait()
        except (queue.Empty, EOFError, OSError):
            return
        if progress is not None:
            progress.status(worker, text)
