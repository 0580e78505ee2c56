"""Per-layer ablation: block v_rev at one layer at a time (and at all layers, and a random direction).

    python analyses/per_layer_ablation.py                      # default toy preset, 5 seeds
    python analyses/per_layer_ablation.py --quick --out results/per_layer_quick

Writes a results folder (the same format as the demo) plus ``per_layer.csv`` — one row per
(seed, blocked) with the final harmfulness and alignment — and its figures.
"""

import argparse
from pathlib import Path

from reversion_lens.experiments import ExperimentConfig, LocalExecutor, run_experiment
from reversion_lens.report import write_report
from reversion_lens.results import per_layer_table
from reversion_lens.toyworld import ToyConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=("default", "paper", "tiny"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--mode", default="grad", help="block mode (grad, clamp, update, ...)")
    ap.add_argument("--out", type=Path, default=Path("results/per_layer"))
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 seeds, 40 steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", help="toy history cache (default ~/.cache/reversion_lens)")
    ap.add_argument("--format", choices=("html", "png", "both", "none"), default="both")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.seeds, args.steps = "tiny", 2, 40
    n_layers = ToyConfig.preset(args.preset).n_layers
    arms = ("none", *(f"{args.mode}:v_rev@{layer}" for layer in range(n_layers)), f"{args.mode}:v_rev", f"{args.mode}:random")
    config = ExperimentConfig(
        preset=args.preset,
        seeds=tuple(range(args.seeds)),
        arms=arms,
        steps=args.steps,
        track_steps=tuple(s for s in (1, 5, 20, args.steps) if s <= args.steps),
        eval_steps=(0, args.steps),
        workers=args.workers,
        cache_dir=args.cache_dir,
    )
    out = run_experiment(config, args.out, LocalExecutor(config.workers))
    table = per_layer_table(out, config)
    print(table.groupby("blocked", sort=False)[["harmful_rate", "final_cos"]].agg(["mean", "std"]).round(3).to_string())
    if args.format != "none":
        formats = ("html", "png") if args.format == "both" else (args.format,)
        write_report(out, formats=formats)
        print(f"figures -> {out / 'figures'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
