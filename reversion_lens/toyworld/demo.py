"""``reversion-lens demo``: the toy world end to end.

Builds (or loads from the cache) a three-phase history per seed, derives v_rev, fine-tunes the aligned
model on harmless data in every arm while tracking the drift, evaluates harmfulness and task cost, and
writes ``trajectories.csv``, ``summary.json``, ``summary.md`` and the figures into ``--out``.
Interrupted? Run the same command again: finished seeds and runs are kept, the rest resume.
"""

import argparse
import sys
import time
from pathlib import Path

from .. import _STARTED
from ..errors import ConfigError
from ..pipeline import ExperimentConfig, LocalExecutor, run_experiment

__all__ = ["add_arguments", "run", "config_from_args", "main"]

#: The demo's design (see analyses/variance_sources.py): 12 seeds, whose pretrained bases ship with the package
#: (reversion_lens/toyworld/bases), so the paired block effect's interval is narrow enough to mean something and
#: the numbers do not depend on the CPU's float path; evaluated after alignment and at T.
DEMO = {"seeds": tuple(range(12)), "eval_steps": (0, 100)}
QUICK = {"seeds": (0, 1), "track_steps": (1, 5, 20, 50), "eval_steps": (0, 50), "steps": 50}
QUICK_TOY = {"preset": "tiny", "n_probes": 64}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("default", "paper", "tiny"), help="toy history size (default: default)")
    p.add_argument("--seeds", help="a count (12 = seeds 0..11, the default) or a comma list of seed values (0,3,7)")
    p.add_argument("--steps", type=int, help="fine-tuning steps T (default 100)")
    p.add_argument(
        "--arms", help="comma list of arms (default: none,grad:v_rev,grad:random,clamp:v_rev,control:rehearsal)"
    )
    p.add_argument("--out", default="results/demo", help="results folder (default: results/demo)")
    p.add_argument(
        "--quick", action="store_true", help="2 seeds, the tiny preset, 64 probes, 50 steps: a smoke run under a minute"
    )
    p.add_argument(
        "--config", type=Path, help="TOML file with ExperimentConfig fields and a [toy] table (options override it)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--workers", type=int, help="parallel processes (default 2, one torch thread each)")
    p.add_argument("--cache-dir", help="where toy histories are cached (default ~/.cache/reversion_lens)")
    p.add_argument(
        "--figures", choices=("html", "png", "both", "none"), default="both", help="figures to write into OUT/figures"
    )


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "," in text:
            return tuple(int(x) for x in text.split(",") if x.strip())
        n = int(text)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (5) or a comma list (0,3,7).") from None
    if n < 1:
        raise ConfigError("--seeds must be at least 1.")
    return tuple(range(n))


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    base = ExperimentConfig.from_toml(args.config).to_dict() if args.config else {}
    if base.get("setting", "toy") != "toy":
        raise ConfigError(f"{args.config} is a {base['setting']!r} config; `reversion-lens demo` runs the toy world. "
                          f"Use `reversion-lens run {args.config}`.")  # fmt: skip
    toy = dict(base.pop("toy", {}))
    if not args.config:
        base.update(DEMO)
    if args.quick:
        base.update(QUICK)
        toy.update(QUICK_TOY)
    if args.preset:
        toy["preset"] = args.preset
    over = {
        "seeds": _seeds(args.seeds) if args.seeds else None,
        "steps": args.steps,
        "arms": tuple(a.strip() for a in args.arms.split(",")) if args.arms else None,
        "workers": args.workers,
        "cache_dir": args.cache_dir,
    }
    base.update({k: v for k, v in over.items() if v is not None})
    if args.steps is not None:  # keep logged steps inside 0..T
        defaults = ExperimentConfig()
        base["track_steps"] = tuple(s for s in base.get("track_steps", defaults.track_steps) if s <= args.steps) or (
            args.steps,
        )
        evals = [s for s in base.get("eval_steps", defaults.eval_steps) if s <= args.steps]
        base["eval_steps"] = tuple(sorted(set(evals) | {args.steps}))
        if args.steps not in base["track_steps"]:
            base["track_steps"] = (*base["track_steps"], args.steps)
    return ExperimentConfig.from_dict({**base, "setting": "toy", "toy": toy})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.print_config:
        sys.stdout.write(config.to_toml())
        return 0
    out = run_experiment(config, args.out, LocalExecutor(config.workers, config.threads_per_worker))
    if args.figures != "none":
        from ..report import write_report

        formats = {"html": ("html",), "png": ("png",), "both": ("html", "png")}[args.figures]
        report = write_report(out, formats=formats)
        print(f"report: {report.html}; {len(report.figures)} figures in {Path(out) / 'figures'}")
    print((Path(out) / "summary.md").read_text())
    print(f"done in {time.perf_counter() - _STARTED:.0f} s (imports included) -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reversion-lens demo", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
