"""The second reversion setting: does benign fine-tuning bring an unlearned operation back?

    python analyses/unlearning.py                              # default preset, forget `rev`, seeds 0-4
    python analyses/unlearning.py --quick --out results/unlearning_quick

History per seed: the main setting's pretrained model (shared cache), then an unlearning phase in which
``--forget`` is refused while the other operations are answered (``base`` -> ``aligned``). v_rev is
derived on held-out prompts of the forgotten operation. Fine-tuning on the *other* operations only
(``benign``), and the control that keeps the unlearning refusals mixed in (``aligned-mix``), each at
every ``--lrs`` learning rate. Measured at each logged step: re-emergence (``forget_rate``: the
forgotten operation no longer refused; ``forget_accuracy``: answered fully correctly), retained
accuracy, and cos(drift, v_rev) per layer on the forget probes.

Writes ``--out``/``rows.csv`` (one row per seed, data, lr, step, layer), ``summary.md`` (mean ± std
over seeds at the last step) and one ``runs/*.json`` per finished run: rerun the same command after an
interruption and finished runs are kept.
"""

import argparse
from pathlib import Path

import pandas as pd

from reversion_lens import mean_difference
from reversion_lens.experiments import ExperimentConfig, LocalExecutor, write_rows_csv
from reversion_lens.io import atomic_write_text, read_json, torch_threads, write_json
from reversion_lens.toyworld import ToyConfig, build_unlearning_history
from reversion_lens.tracking import DriftTracker
from reversion_lens.training import finetune

COLUMNS = ("seed", "data", "lr", "step", "layer", "cos", "forget_rate", "forget_accuracy", "forget_refusal_prob",
           "retain_accuracy")  # fmt: skip


def run(task: tuple) -> list[dict]:
    """One (seed, data, lr) fine-tuning run, measured at ``log_steps``; cached in ``runs/``."""
    preset, forget, seed, data, lr, steps, log_steps, cache_dir, out = task
    path = Path(out) / "runs" / f"seed{seed}-{data}-lr{lr:g}.json"
    if path.exists():
        return read_json(path)["rows"]
    with torch_threads(1):
        hist = build_unlearning_history(ToyConfig.preset(preset), seed, forget, cache_dir=cache_dir)
        probes = hist.probes("forget")
        st = hist.history.stats(probes, ["base", "aligned"])
        v = mean_difference(st["base"], st["aligned"])
        tracker = DriftTracker(probes, v, reference=st["aligned"], base=st["base"])
        rows: list[dict] = []

        def measure(step: int, model) -> None:
            m = hist.measure(model)
            cos = {} if step == 0 else {r["layer"]: r["cos"] for r in tracker.measure(step, model)}
            rows.extend({"seed": seed, "data": data, "lr": lr, "step": step, "layer": layer, "cos": cos.get(layer), **m}
                        for layer in v.layers)  # fmt: skip

        model = hist.load("aligned")
        finetune(model, hist.finetune_data(data), steps, optim=hist.finetune_optim(lr=lr), callbacks=[measure],
                 callback_steps=log_steps, progress=False)  # fmt: skip
    write_json(path, {"rows": rows})
    return rows


def _pm(x: pd.Series, digits: int) -> str:
    return f"{x.mean():.{digits}f} ± {x.std():.{digits}f}"


def _each(x: pd.Series) -> str:
    return ", ".join(f"{v:.0f}" for v in x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("default", "paper", "tiny"), help="toy history size (default: default)")
    ap.add_argument("--forget", default="rev", help="the operation to unlearn (default: rev)")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--lrs", default="1e-4,3e-4", help="fine-tuning learning rates, comma list")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default 100)")
    ap.add_argument("--out", type=Path, default=Path("results/unlearning"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", help="toy history cache, as the demo's --cache-dir (default ~/.cache/reversion_lens)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 seeds, 50 steps (unless given)")
    args = ap.parse_args(argv)
    defaults = {"preset": "tiny", "seeds": 2, "steps": 50} if args.quick else {"preset": "default", "seeds": 5, "steps": 100}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cache = ExperimentConfig(cache_dir=args.cache_dir).resolved_cache_dir() / "toyworld"  # the demo's cache
    lrs = [float(x) for x in args.lrs.split(",")]
    log_steps = sorted({0, 1, 5, 20, args.steps} & set(range(args.steps + 1)))
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    tasks = [(args.preset, args.forget, s, data, lr, args.steps, log_steps, str(cache), str(args.out))
             for s in range(args.seeds) for lr in lrs for data in ("benign", "aligned-mix")]  # fmt: skip
    rows = [r for rs in LocalExecutor(args.workers).map(run, tasks) for r in rs]
    write_rows_csv(args.out / "rows.csv", rows, COLUMNS)
    df = pd.DataFrame(rows)
    last = df[(df.step == args.steps) & (df.layer == df.layer.max())]
    start = df[(df.step == 0) & (df.layer == df.layer.max())]
    lines = [f"# Unlearning `{args.forget}`: re-emergence after {args.steps} fine-tuning steps", "",
             f"Preset `{args.preset}`, {args.seeds} seeds, mean ± std over seeds; cos at layer {int(df.layer.max())}. "
             f"After unlearning: forget_rate {100 * start.forget_rate.mean():.1f}%, retained accuracy "
             f"{100 * start.retain_accuracy.mean():.1f}%.", "",
             "| fine-tuning data | lr | forget_rate | forget_accuracy | P(REFUSE) | retained accuracy | cos(drift, v_rev) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for (data, lr), g in last.groupby(["data", "lr"], sort=False):
        pct = {c: _pm(100 * g[c], 1) + "%" for c in ("forget_rate", "forget_accuracy", "retain_accuracy")}
        lines.append(f"| {data} | {lr:g} | {pct['forget_rate']} (per seed {_each(100 * g.forget_rate)}) | "
                     f"{pct['forget_accuracy']} | {_pm(g.forget_refusal_prob, 2)} | {pct['retain_accuracy']} | "
                     f"{_pm(g.cos, 2)} |")  # fmt: skip
    atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
