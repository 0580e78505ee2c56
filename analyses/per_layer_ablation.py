"""Per-layer ablation: block v_rev at one layer at a time (and at all layers, and a random direction).

    python analyses/per_layer_ablation.py                      # default toy preset, 5 seeds
    python analyses/per_layer_ablation.py --quick --out results/per_layer_quick
    python analyses/per_layer_ablation.py --config smollm2.toml --layers 0,10,20,29 --out results/smol_layers

Any setting: with ``--config`` the experiment of that TOML file (seeds, steps, the setting's table) is run
with the per-layer arms instead of its own (``--layers`` picks the layers to block one at a time; default
every layer).

Writes a results folder (the same format as the demo) plus ``per_layer.csv`` — one row per
(seed, blocked) with the final harmfulness and alignment — and its figures.
"""

import argparse
from pathlib import Path

from reversion_lens.pipeline import ExperimentConfig, LocalExecutor, make_setting, run_experiment
from reversion_lens.pipeline.results import per_layer_table
from reversion_lens.report import write_report


def _layers(text: str | None, n_layers: int) -> list[int]:
    if not text:
        return list(range(n_layers))
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="an experiment TOML (any setting); default: the toy world")
    ap.add_argument(
        "--preset", default="default", choices=("default", "paper", "tiny"), help="toy preset (no --config)"
    )
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 5, or the config's)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default 100, or the config's)")
    ap.add_argument("--layers", help="layers to block one at a time: 0,2,5 or 0-3 (default: every layer)")
    ap.add_argument("--mode", default="grad", help="block mode (grad, clamp, update, ...)")
    ap.add_argument("--out", type=Path, default=Path("results/per_layer"))
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 seeds, 40 steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", help="history cache (default ~/.cache/reversion_lens)")
    ap.add_argument("--format", choices=("html", "png", "both", "none"), default="both")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.seeds, args.steps = "tiny", 2, 40
    base = ExperimentConfig.from_toml(args.config) if args.config else ExperimentConfig(params={"preset": args.preset})
    seeds = tuple(range(args.seeds)) if args.seeds else base.seeds
    steps = args.steps or base.steps
    n_layers = make_setting(base).n_layers
    if n_layers is None:
        raise SystemExit("the setting does not know its layer count before loading; pass --layers explicitly.")
    layers = _layers(args.layers, n_layers)
    arms = ("none", *(f"{args.mode}:v_rev@{layer}" for layer in layers), f"{args.mode}:v_rev", f"{args.mode}:random")
    config = base.replace(
        seeds=seeds, arms=arms, steps=steps, track_steps=tuple(s for s in (1, 5, 20, steps) if s <= steps),
        eval_steps=(0, steps), workers=args.workers, cache_dir=args.cache_dir or base.cache_dir,
    )  # fmt: skip
    out = run_experiment(config, args.out, LocalExecutor(config.workers, config.threads_per_worker))
    table = per_layer_table(out, config)
    print(table.groupby("blocked", sort=False)[["harmful_rate", "final_cos"]].agg(["mean", "std"]).round(3).to_string())
    if args.format != "none":
        formats = ("html", "png") if args.format == "both" else (args.format,)
        write_report(out, formats=formats)
        print(f"figures -> {out / 'figures'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
