"""Run experiment tasks on a Ray cluster: :class:`RayExecutor`, an :class:`~reversion_lens.pipeline.Executor`.

Ray is an optional extra (``pip install 'reversion_lens[ray]'``) and is imported only when a map runs.

::

    from reversion_lens.distributed import RayExecutor
    from reversion_lens.pipeline import ExperimentConfig, run_experiment

    config = ExperimentConfig(seeds=(0, 1, 2, 3, 4), threads_per_worker=2)
    run_experiment(config, "/shared/results/sweep", executor=RayExecutor("auto", num_cpus_per_task=2))

Each item becomes one Ray task (``ray.remote(num_cpus=num_cpus_per_task)``) that runs ``fn(item)`` with
torch's thread count set to ``num_cpus_per_task``; results come back in the order of ``items``. An item
with a ``num_gpus`` attribute (the runner's tasks have one: 1 when the setting runs on CUDA) asks Ray for
that many GPUs, so a sweep on a GPU cluster puts one run per GPU. Every
task runs to the end even when one fails; then the first failure (in item order) is raised as a
:class:`TaskError` naming its item, so a rerun of :func:`~reversion_lens.pipeline.run_experiment`
only redoes what did not finish (its task functions are idempotent, write each result folder atomically
and lock it, so seeds x arms (x layers, with ``@<layer>`` arms) run in parallel safely).

On a real cluster (``address="auto"`` on a cluster node, or ``"ray://head:10001"``):

* the results folder (``out``) and the toy-history cache (``cache_dir`` or ``$REVERSION_LENS_CACHE``)
  must be on a filesystem every node mounts at the same path (NFS, Lustre, EFS, ...): tasks write
  there and later tasks read what earlier ones wrote. A node-local path gives each node its own copy
  and the aggregation step finds runs missing;
* give absolute paths (``out``, ``cache_dir``): a worker on another node does not share the driver's
  working directory, home folder or ``$REVERSION_LENS_CACHE`` (set ``cache_dir`` explicitly, or pass the
  variable with ``runtime_env={"env_vars": {...}}``); the per-run locks are ``fcntl.flock`` locks, which
  NFSv4 and Lustre honour across nodes but some FUSE mounts do not;
* every node needs ``reversion_lens`` and the same torch version installed (or ship them with
  ``runtime_env={"pip": [...]}`` / ``{"working_dir": ...}``); numbers are identical to a serial run's
  only on identical hardware and software (the test checks this on one machine);
* ``run_experiment``'s task functions set torch threads from ``config.threads_per_worker`` while they
  run, so give ``num_cpus_per_task`` the same value, or Ray reserves cores the task does not use.
"""

import reprlib
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError
from .io import torch_threads

__all__ = ["RayExecutor", "TaskError", "import_ray"]

_INSTALL_HINT = "pip install 'reversion_lens[ray]'"


class TaskError(RuntimeError):
    """A task of an executor failed; the message names its item and the original error (``__cause__``)."""

    def __init__(self, message: str, index: int, item: Any):
        super().__init__(message)
        self.index = index
        self.item = item


def import_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            f"RayExecutor needs Ray, which is not installed: {_INSTALL_HINT} (or pip install 'ray>=2.9'). "
            "Without Ray, use reversion_lens.pipeline.LocalExecutor (local processes) or SerialExecutor."
        ) from e
    return ray


def _run_task(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    """What each Ray task runs: ``fn(item)`` with ``threads`` torch threads (restored afterwards: workers are reused)."""
    with torch_threads(threads):
        return fn(item)


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 120, 120, 3


def _with_gpus(remote: Any, item: Any) -> Any:
    gpus = float(getattr(item, "num_gpus", 0) or 0)
    return remote.options(num_gpus=gpus) if gpus else remote


def _describe_item(item: Any) -> str:
    """A readable, bounded ``repr`` of a task's item for error messages."""
    if isinstance(item, tuple):
        return "(" + ", ".join(_short.repr(x) for x in item) + ("," if len(item) == 1 else "") + ")"
    return _short.repr(item)


class RayExecutor:
    """Runs ``map(fn, items)`` as Ray tasks: ``fn(item)`` remotely, results in order.

    Args:
        address: ``None`` starts a local Ray cluster on this machine on first use (unless Ray is already
            initialised in this process, which is then used as it is); ``"auto"`` or ``"ray://host:10001"``
            connects to a running cluster (see the module docstring for what a cluster needs).
        num_cpus_per_task: CPUs Ray reserves for each task, and torch's thread count inside it.
        runtime_env: a Ray runtime environment (``{"pip": [...], "working_dir": ..., "env_vars": {...}}``);
            the job's when this executor starts Ray, else each task's.
        init_kwargs: further ``ray.init`` keywords (``num_cpus``, ``include_dashboard``, ...).

    Use it as a context manager (``with RayExecutor() as ex: ...``) to shut down a Ray that it started;
    a Ray that was running before is left running.
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus_per_task: int = 1,
        runtime_env: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if not isinstance(num_cpus_per_task, int) or num_cpus_per_task < 1:
            raise ConfigError(f"num_cpus_per_task must be an integer >= 1, got {num_cpus_per_task!r}.")
        init_kwargs = dict(init_kwargs or {})
        clash = sorted({"address", "runtime_env"} & set(init_kwargs))
        if clash:
            raise ConfigError(f"pass {', '.join(clash)} as RayExecutor arguments, not in init_kwargs.")
        self.address = address
        self.num_cpus_per_task = num_cpus_per_task
        self.runtime_env = runtime_env
        self.init_kwargs = init_kwargs
        self._started = False  # True when this executor called ray.init (and so may shut it down)
        self._task_env: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_cpus_per_task={self.num_cpus_per_task})"

    # -------------------------------------------------------------- lifecycle
    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, runtime_env=self.runtime_env, **self.init_kwargs)
            self._started = True
            self._task_env = None
        elif not self._started:  # someone else's Ray: the runtime env can only go on the tasks
            self._task_env = self.runtime_env
        return ray

    def shutdown(self) -> None:
        """Shut Ray down if this executor started it; otherwise do nothing."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -------------------------------------------------------------- the Executor protocol
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], progress: Any = None) -> list[Any]:
        """``[fn(x) for x in items]``, each call a Ray task; raises :class:`TaskError` after all tasks end
        if any failed (the first failed item, in order, is named)."""
        items = list(items)
        if not items:
            return []
        ray = self._connect()
        options: dict[str, Any] = {"num_cpus": self.num_cpus_per_task}
        if self._task_env:
            options["runtime_env"] = self._task_env
        remote = ray.remote(**options)(_run_task)
        fn_ref = ray.put(fn)
        refs = [_with_gpus(remote, x).remote(fn_ref, x, self.num_cpus_per_task) for x in items]
        try:
            pending = list(refs)
            while pending:  # every task ends, failed or not
                ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
                if progress is not None:
                    for ref in ready:
                        item = items[refs.index(ref)]
                        if getattr(item, "counts", True):
                            progress.finished(str(item))
        except BaseException:  # Ctrl-C in the driver: stop the tasks rather than leave them running
            for ref in refs:
                ray.cancel(ref)
            raise
        results: list[Any] = []
        failures: list[tuple[int, BaseException]] = []
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except Exception as e:
                failures.append((i, e))
                results.append(None)
        if failures:
            i, err = failures[0]
            cause = getattr(err, "cause", None) or err
            more = f" ({len(failures) - 1} other task(s) failed too)" if len(failures) > 1 else ""
            raise TaskError(
                f"Ray task {i + 1} of {len(items)} failed on item {_describe_item(items[i])}{more}: "
                f"{type(cause).__name__}: {cause}. The other tasks ran to the end; fix the cause and rerun "
                "(run_experiment skips the runs that completed).",
                i,
                items[i],
            ) from err
        return results
