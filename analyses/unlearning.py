"""The second reversion setting: does benign fine-tuning bring an unlearned operation back?

    python analyses/unlearning.py                              # default preset, forget `rev`, seeds 0-4
    python analyses/unlearning.py --quick --out results/unlearning_quick

The ``unlearning`` setting of the experiment runner (``reversion_lens.toyworld.setting``): per seed, the
main setting's pretrained model (shared cache), then an unlearning phase in which ``--forget`` is refused
while the other operations are answered (``base`` -> ``aligned``); v_rev is derived on held-out prompts of
the forgotten operation. Arms ``none`` (fine-tuning on the *other* operations only) and
``control:rehearsal`` (the unlearning refusals mixed back in), one results folder per ``--lrs`` learning
rate (``--out``/lr<lr>/, the same layout as every experiment). The harm columns measure re-emergence:
``harmful_rate`` = the forgotten operation no longer refused, ``harmful_correct_rate`` = answered fully
correctly (the capability itself), ``task_accuracy`` = the retained operations.

Writes ``--out``/summary.md (mean ± std over seeds at the last step). Rerun the same command after an
interruption: finished runs are kept.
"""

import argparse
from pathlib import Path

import pandas as pd

from reversion_lens.io import atomic_write_text
from reversion_lens.pipeline import ExperimentConfig, LocalExecutor, run_experiment


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
    ap.add_argument("--cache-dir", help="history cache, as the demo's --cache-dir (default ~/.cache/reversion_lens)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 seeds, 50 steps (unless given)")
    args = ap.parse_args(argv)
    defaults = (
        {"preset": "tiny", "seeds": 2, "steps": 50} if args.quick else {"preset": "default", "seeds": 5, "steps": 100}
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    log_steps = tuple(sorted({0, 1, 5, 20, args.steps} & set(range(args.steps + 1))))
    frames = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        config = ExperimentConfig(
            setting="unlearning", params={"preset": args.preset, "forget": args.forget},
            seeds=tuple(range(args.seeds)), arms=("none", "control:rehearsal"), steps=args.steps,
            track_steps=tuple(s for s in log_steps if s > 0), eval_steps=log_steps, finetune_lr=lr,
            workers=args.workers, cache_dir=args.cache_dir,
        )  # fmt: skip
        out = run_experiment(config, args.out / f"lr{lr:g}", LocalExecutor(config.workers))
        frames.append(pd.read_csv(out / "trajectories.csv").assign(lr=lr))
    df = pd.concat(frames, ignore_index=True)
    top = df.layer.max()
    last = df[(df.step == args.steps) & (df.layer == top)]
    start = df[(df.step == 0) & (df.layer == top) & (df.arm == "none")]
    lines = [f"# Unlearning `{args.forget}`: re-emergence after {args.steps} fine-tuning steps", "",
             f"Preset `{args.preset}`, {args.seeds} seeds, mean ± std over seeds; cos at layer {int(top)}. "
             f"After unlearning: forgotten op not refused {100 * start.harmful_rate.mean():.1f}%, retained accuracy "
             f"{100 * start.task_accuracy.mean():.1f}%.", "",
             "| fine-tuning | lr | forgotten op no longer refused | answered correctly | P(REFUSE) | retained accuracy "
             "| cos(drift, v_rev) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    names = {"none": "other operations", "control:rehearsal": "… with the refusals mixed in (control)"}
    for (lr, arm), g in last.groupby(["lr", "arm"], sort=True):
        pct = {c: _pm(100 * g[c], 1) + "%" for c in ("harmful_rate", "harmful_correct_rate", "task_accuracy")}
        lines.append(f"| {names.get(arm, arm)} | {lr:g} | {pct['harmful_rate']} (per seed {_each(100 * g.harmful_rate)}) | "
                     f"{pct['harmful_correct_rate']} | {_pm(g.refusal_prob, 2)} | {pct['task_accuracy']} | "
                     f"{_pm(g.cos, 2)} |")  # fmt: skip
    atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
