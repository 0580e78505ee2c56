"""RayExecutor: the Executor protocol on a local two-CPU Ray cluster, and a sweep identical to a serial one."""

import csv
import io
import os
import sys

import pytest
import torch

from reversion_lens.distributed import RayExecutor, TaskError, import_ray
from reversion_lens.errors import ConfigError
from reversion_lens.pipeline import ExperimentConfig, SerialExecutor, run_experiment


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")  # only where Ray is absent: the dev extra installs it
    # The workers cannot import this test module (pytest's rootdir import), so ship its functions by value,
    # as cloudpickle does for functions defined in a notebook or a script's __main__.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def square_threads_pid(x: int) -> tuple[int, int, int]:
    return x * x, torch.get_num_threads(), os.getpid()


def touch_or_fail(task: tuple[str, int]) -> int:
    folder, x = task
    if x == 2:
        raise KeyError(f"no value for {x}")
    open(os.path.join(folder, f"done_{x}"), "w").close()
    return x


def test_map_returns_results_in_order_from_worker_processes(ray_cluster):
    out = RayExecutor(num_cpus_per_task=1).map(square_threads_pid, list(range(6)))
    assert [r[0] for r in out] == [x * x for x in range(6)]
    assert {r[1] for r in out} == {1}  # torch threads = num_cpus_per_task inside each task
    assert os.getpid() not in {r[2] for r in out}  # ran remotely, not in this process
    assert RayExecutor().map(square_threads_pid, []) == []
    assert RayExecutor(num_cpus_per_task=2).map(square_threads_pid, [5])[0][:2] == (25, 2)


def test_failure_names_the_item_and_the_other_tasks_finish(ray_cluster, tmp_path):
    items = [(str(tmp_path), x) for x in range(4)]
    with pytest.raises(TaskError) as info:
        RayExecutor().map(touch_or_fail, items)
    err = info.value
    assert err.index == 2 and err.item == items[2]
    msg = str(err)
    assert "task 3 of 4" in msg and f"({str(tmp_path)!r}, 2)" in msg and "KeyError" in msg and "no value for 2" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done_0", "done_1", "done_3"]


def test_an_executor_leaves_a_running_ray_running(ray_cluster):
    with RayExecutor() as ex:
        assert ex.map(square_threads_pid, [3])[0][0] == 9
    assert ray_cluster.is_initialized()


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="num_cpus_per_task"):
        RayExecutor(num_cpus_per_task=0)
    with pytest.raises(ConfigError, match="RayExecutor arguments"):
        RayExecutor(init_kwargs={"address": "auto"})


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'reversion_lens\[ray\]'"):
        import_ray()
    with pytest.raises(ImportError, match="reversion_lens"):
        RayExecutor().map(square_threads_pid, [1])


def test_sweep_on_ray_matches_the_serial_sweep(ray_cluster, tmp_path):
    config = ExperimentConfig(
        params={"preset": "tiny", "pretrain_steps": 100, "n_eval": 64, "n_eval_benign": 64, "n_probes": 32},
        seeds=(0,), arms=("none", "grad:v_rev"), steps=5, track_steps=(1, 5), eval_steps=(0, 5),  # equality, not reversion
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    serial = run_experiment(config, tmp_path / "serial", executor=SerialExecutor(), log=None)
    on_ray = run_experiment(config, tmp_path / "ray", executor=RayExecutor(num_cpus_per_task=1), log=None)
    a, b = (serial / "trajectories.csv").read_bytes(), (on_ray / "trajectories.csv").read_bytes()
    assert a == b
    lines = a.decode().splitlines()
    assert len(lines) == 1 + 2 * 3 * 2  # header + arms x logged steps (0, 1, 5) x layers
    rows = list(csv.DictReader(io.StringIO(a.decode())))
    cos = {(r["arm"], r["step"], r["layer"]): float(r["cos"]) for r in rows if r["cos"]}
    assert len(cos) == 2 * 2 * 2  # tracked at steps 1 and 5
    assert cos[("grad:v_rev", "5", "1")] != cos[("none", "5", "1")]  # the block acted in the Ray workers
    for arm in config.arms:  # every run's own files agree too
        for name in ("trajectory.csv", "evals.json"):
            rel = f"runs/seed0/{arm}/{name}"
            assert (serial / rel).read_bytes() == (on_ray / rel).read_bytes(), rel
