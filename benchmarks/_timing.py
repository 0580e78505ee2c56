"""Shared benchmark method (PERFORMANCE.md): variants round-robin in one process, process CPU time,
ratios taken within a round against a baseline measured in the same round, median [min-max]."""

import statistics
import time
from collections.abc import Callable


def cpu_time(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def round_robin(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(cpu_time(fn))
    return times


def ratio_table(times: dict[str, list[float]], baseline: str) -> list[tuple[str, float, float, float, float]]:
    """(name, median seconds, median ratio, min ratio, max ratio) with ratios taken round by round."""
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[baseline])]
        rows.append((name, statistics.median(ts), statistics.median(ratios), min(ratios), max(ratios)))
    return rows


def print_table(rows, title: str, extra: dict[str, str] | None = None) -> None:
    print(f"\n{title}")
    print(f"{'variant':<48} {'CPU s (median)':>14} {'ratio median [min-max]':>26}" + ("  " + "kept" if extra else ""))
    for name, med, r, lo, hi in rows:
        tail = f"  {extra.get(name, '')}" if extra else ""
        print(f"{name:<48} {med:>14.3f} {r:>10.3f} [{lo:.3f}-{hi:.3f}]{tail}")
