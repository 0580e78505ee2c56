"""``reversion-lens``: the command line, a thin client of the experiment pipeline.

::

    reversion-lens run CONFIG.toml --out DIR          any setting, seeds x arms, resumable (the paper's experiment)
    reversion-lens run --example toy|hf               print a complete, commented config
    reversion-lens demo [...]                         the toy world end to end (see ``reversion-lens demo -h``)
    reversion-lens direction --base SPEC --aligned SPEC --prompts SRC --out DIR
    reversion-lens track --model SPEC --data SRC --prompts SRC --direction DIR --steps N --out DIR
    reversion-lens eval --model SPEC --prompts SRC [--benign SRC] [--judge refusal|module:callable]

SPEC is a model spec (:mod:`reversion_lens.specs`): a local Hugging Face folder, a native checkpoint folder,
a hub name, ``NAME@REVISION`` or ``EleutherAI/pythia-160m@step1000``. SRC is a prompt source: ``.txt``,
``.jsonl``, ``.json``, ``.csv`` (``--prompt-field``, ``--where COLUMN=VALUE``), ``hf:NAME[@SPLIT]`` or
``harmbench:test``. ``direction`` and ``track`` build a Hugging Face experiment config (``setting = "hf"``)
from their options and run the pipeline on it: the same arm grammar, trajectory schema, null suite and
results folder as ``run`` (``track --direction DIR`` reuses DIR's statistics when the history matches).
Every spec, file and option is checked before any model loads.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_layers"]


# ---------------------------------------------------------------------- argument helpers
def parse_layers(tokens: list[str] | None) -> list[int] | None:
    """``["0", "2"]``, ``["0-3"]``, ``["0,2,-1"]`` -> layer list (ranges inclusive); ``None``/``["all"]`` -> None."""
    from .errors import SiteError

    if not tokens or tokens == ["all"]:
        return None
    out: list[int] = []
    for token in tokens:
        for part in token.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise SiteError(f"--layers {token!r}: use integers, ranges such as 0-3, or 'all'.") from None
    return out


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: CUDA when available)")
    g.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    g.add_argument("--device-map", help="accelerate device map: auto, balanced, sequential (excludes --device)")


def _add_text_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompt-field",
        default=None,
        help="field (column) holding the prompt in JSONL / CSV / data sets (default: 'prompt'; HarmBench: 'Behavior')",
    )
    g.add_argument("--where", help="keep only rows with COLUMN=VALUE (CSV / JSONL), e.g. FunctionalCategory=standard")
    g.add_argument("--limit", type=int, help="use only the first N prompts")
    g.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    g.add_argument("--system", help="system prompt (chat templates only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reversion-lens",
        description="Measure and block fine-tuning reversion along history-defined directions.",
        epilog="Run 'reversion-lens COMMAND -h' for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser(
        "run",
        help="an experiment config: seeds x arms on any setting, resumable",
        description="Run (or resume) every seed x arm of a TOML config into --out: results, "
        "summary.md, report.html and figures. `--example toy|hf` prints a commented config.",
    )
    r.add_argument("config", nargs="?", type=Path, help="the TOML config (see --example)")
    r.add_argument("--example", choices=("toy", "hf"), help="print a complete, commented config and exit")
    r.add_argument("--out", type=Path, help="results folder (default: results/<config name>)")
    r.add_argument("--workers", type=int, help="parallel processes (overrides the config's workers)")
    r.add_argument("--figures", choices=("html", "png", "both", "none"), default="both", help="figures to write")

    d = sub.add_parser(
        "direction",
        help="v_rev from a base and an aligned checkpoint",
        description="Probe statistics of both checkpoints (one model in memory at a time), v_rev "
        "per layer and the null models, written as seed 0 of a results folder. Prompts are tokenised "
        "with the aligned model's tokenizer (its chat template when --chat auto finds one).",
    )
    d.add_argument("--base", required=True, help="model spec of the earlier (base) checkpoint")
    d.add_argument("--aligned", required=True, help="model spec of the later (aligned) checkpoint")
    d.add_argument("--prompts", required=True, help="probe prompts: a prompt source (see reversion-lens -h)")
    d.add_argument("--out", required=True, type=Path, help="result folder")
    d.add_argument("--site", default="resid_post", help="residual site (default resid_post)")
    d.add_argument("--method", default="mean_difference", help="estimator: mean_difference, principal_component, ...")
    d.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    _add_text_options(d)
    _add_model_options(d)

    t = sub.add_parser(
        "track",
        help="fine-tune with drift tracking (and optionally a block)",
        description="Fine-tune --model on prompt/response data, measuring the probe drift along "
        "v_rev, in one arm of the pipeline (a results folder with trajectories.csv and summary.md).",
    )
    t.add_argument("--model", required=True, help="model spec to fine-tune (the aligned checkpoint)")
    t.add_argument(
        "--data", required=True, help="fine-tuning data: .jsonl/.json/.csv with prompt and response, or hf:NAME"
    )
    t.add_argument("--prompts", required=True, help="probe prompts (the ones the direction was derived on)")
    t.add_argument("--direction", required=True, type=Path, help="result folder of 'reversion-lens direction'")
    t.add_argument("--steps", required=True, type=int, help="fine-tuning steps")
    t.add_argument("--block", default="none", help="intervention mode: none (default), grad, clamp, update, ...")
    t.add_argument(
        "--block-direction",
        choices=("v_rev", "random"),
        default="v_rev",
        help="block along v_rev (default) or a seeded random control direction",
    )
    t.add_argument("--layers", nargs="+", help="layers to block (default: all)")
    t.add_argument("--arm", help="the arm, in the pipeline's grammar (e.g. grad:v_rev@0,2); overrides --block")
    t.add_argument("--out", required=True, type=Path, help="result folder")
    t.add_argument("--seed", type=int, default=0, help="data order and control-direction seed (default 0)")
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    t.add_argument("--train-batch-size", type=int, default=8, help="examples per step (default 8)")
    t.add_argument("--batch-size", type=int, default=16, help="probe prompts per forward pass (default 16)")
    t.add_argument("--track-every", type=int, help="measure every K steps (default: 1, 2, 5, 10, 20, 50, ... and N)")
    t.add_argument("--eval-prompts", help="harmful prompts for harmful_rate at --eval-steps (optional)")
    t.add_argument("--benign-prompts", help="benign prompts for over_refusal_rate at --eval-steps (optional)")
    t.add_argument("--heldout", help="held-out prompt/response data for task loss and accuracy (optional)")
    t.add_argument("--eval-steps", help="comma list of steps to evaluate at (default: 0 and N)")
    t.add_argument("--penalty-weight", type=float, default=1.0, help="weight of the penalty modes (default 1)")
    t.add_argument("--judge", default="refusal", help="refusal, classifier:FOLDER, llm:MODEL or package.module:name")
    t.add_argument("--max-new-tokens", type=int, default=48)
    t.add_argument("--response-field", default="response", help="field holding the response in --data records")
    t.add_argument(
        "--checkpoint-every", type=int, help="resumable state every K steps (default: auto, <= ~5%% overhead)"
    )
    t.add_argument("--keep-state", action="store_true", help="keep the final resumable state")
    t.add_argument(
        "--save-model",
        choices=("none", "final", "evaluated"),
        default="none",
        help="write the fine-tuned model as a Hugging Face folder (final, or at every evaluated step)",
    )
    _add_text_options(t)
    _add_model_options(t)

    e = sub.add_parser(
        "eval",
        help="harm, refusal and over-refusal rates of a model",
        description="Greedy responses to harmful (and benign) prompts, judged; rates and responses.",
    )
    e.add_argument("--model", required=True, help="model spec (a folder written by --save-model works)")
    e.add_argument("--prompts", required=True, help="harmful prompts: a prompt source (harmbench:test, a file)")
    e.add_argument("--benign", help="benign prompts for the over-refusal rate (optional)")
    e.add_argument(
        "--judge",
        default="refusal",
        help="refusal (refusal phrases, default), classifier:FOLDER, llm:MODEL or package.module:name",
    )
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    e.add_argument("--out", type=Path, help="result folder for responses.jsonl and summary.txt (optional)")
    _add_text_options(e)
    _add_model_options(e)

    sub.add_parser("demo", help="the toy world end to end (see 'reversion-lens demo -h')", add_help=False)
    return p


# ---------------------------------------------------------------------- shared
def _source(path: str, args: argparse.Namespace, prompts: bool = True, **extra: Any) -> dict[str, Any]:
    """A source table; ``--where`` and ``--limit`` select prompts, never fine-tuning or held-out examples."""
    src: dict[str, Any] = {"path": str(path), **extra}
    if args.prompt_field is not None:  # else the source's own default ('prompt'; 'Behavior' for harmbench:)
        src["field"] = args.prompt_field
    if prompts and getattr(args, "where", None):
        src["where"] = args.where
    if prompts and getattr(args, "limit", None) is not None:
        src["limit"] = args.limit
    return src


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": args.dtype}
    if args.device_map:
        out["device_map"] = args.device_map
    else:
        out["device"] = args.device
    return out


def _chat(args: argparse.Namespace) -> Any:
    return {"auto": "auto", "on": True, "off": False}[args.chat]


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _write_report(out: Path, figures: str) -> None:
    if figures == "none":
        return
    from .report import write_report

    formats = {"html": ("html",), "png": ("png",), "both": ("html", "png")}[figures]
    report = write_report(out, formats=formats)
    _say(f"report: {report.html}; {len(report.figures)} figures in {out / 'figures'}"
         + (f" (no PNGs: {report.png_skipped})" if report.png_skipped else ""))  # fmt: skip


# ---------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .pipeline import ExperimentConfig, LocalExecutor, run_experiment
    from .pipeline.examples import EXAMPLES

    if args.example:
        sys.stdout.write(EXAMPLES[args.example])
        return 0
    if args.config is None:
        raise ConfigError("give a config file (reversion-lens run CONFIG.toml) or --example toy|hf to print one.")
    t0 = time.perf_counter()
    config = ExperimentConfig.from_toml(args.config)
    if args.workers:
        config = config.replace(workers=args.workers)
    out = args.out or Path("results") / args.config.stem
    run_experiment(config, out, LocalExecutor(config.workers, config.threads_per_worker), log=_say)
    _write_report(Path(out), args.figures)
    print((Path(out) / "summary.md").read_text())
    _say(f"done in {time.perf_counter() - t0:.0f} s -> {out}")
    return 0


# ---------------------------------------------------------------------- direction
def cmd_direction(args: argparse.Namespace) -> int:
    from .directions import Direction
    from .io import atomic_write_text, read_json
    from .pipeline import ExperimentConfig, SerialExecutor, seed_dir
    from .pipeline.layout import record_config
    from .pipeline.runner import Task, run_task

    t0 = time.perf_counter()
    params = {"base": args.base, "aligned": args.aligned, "probes": _source(args.prompts, args), "chat": _chat(args),
              "system": args.system, "probe_batch_size": args.batch_size, **_placement(args)}  # fmt: skip
    config = ExperimentConfig(setting="hf", params=params, seeds=(0,), arms=("none",), steps=1, track_steps=(1,),
                              eval_steps=(), site=args.site, direction=args.method, workers=1)  # fmt: skip
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    record_config(out, config)
    SerialExecutor().map(run_task, [Task("seed", config, 0, str(out))])
    folder = seed_dir(out, 0)
    info = read_json(folder / "seed.json")
    v = Direction.load(folder / "direction.safetensors")
    norms = v.norms.double()
    hi, lo = int(norms.argmax()), int(norms.argmin())
    iso = info["nulls"].get("isotropic", [None])[0]
    summary = (
        f"reversion-lens direction: v_rev ({args.method}) at {args.site}, {len(v.layers)} layers, d_model {v.d_model}; "
        f"base = {args.base}, aligned = {args.aligned}. The base-to-aligned distance is largest at layer "
        f"{v.layers[hi]} ({norms[hi]:.4g}) and smallest at layer {v.layers[lo]} ({norms[lo]:.4g}). Nulls per layer "
        f"(p99 of cos(drift, v_rev)): isotropic {iso:.3f}, covariance-matched "
        f"{min(info['nulls']['matched']):.3f}..{max(info['nulls']['matched']):.3f}. Wrote {folder} "
        f"(direction.safetensors, history/, seed.json) in {time.perf_counter() - t0:.1f} s."
    )
    atomic_write_text(out / "summary.txt", summary + "\n")
    print(summary)
    return 0


# ---------------------------------------------------------------------- track
def _steps(text: str | None, steps: int, what: str) -> tuple[int, ...] | None:
    from .errors import ConfigError

    if text is None:
        return None
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"{what} {text!r}: give a comma list of steps, e.g. 0,50,100.") from None
    bad = [s for s in out if not 0 <= s <= steps]
    if bad:
        raise ConfigError(f"{what}: steps {bad} are outside 0..{steps}.")
    return tuple(out)


def _direction_config(folder: Path) -> Any:
    from .errors import ResultsFormatError
    from .io import read_json
    from .pipeline import ExperimentConfig

    path = folder / "config.json"
    if not path.exists() or not (folder / "runs" / "seed0" / "seed.json").exists():
        raise ResultsFormatError(
            f"{folder} is not a complete 'reversion-lens direction' result folder (no config.json or "
            "runs/seed0/seed.json); run reversion-lens direction --out FOLDER first, or point --direction at it."
        )
    cfg = ExperimentConfig.from_dict(read_json(path)["config"])
    if cfg.setting != "hf":
        raise ResultsFormatError(f"{folder} holds a {cfg.setting!r} experiment, not a Hugging Face direction.")
    return cfg


def cmd_track(args: argparse.Namespace) -> int:
    from .errors import ConfigError, ProbeError
    from .pipeline import Arm, ExperimentConfig, SerialExecutor, run_experiment
    from .training import tracking_steps

    t0 = time.perf_counter()
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}.")
    if args.track_every is not None and args.track_every < 1:
        raise ConfigError(f"--track-every must be >= 1, got {args.track_every}.")
    dir_cfg = _direction_config(args.direction)
    old = dir_cfg.params
    if args.arm:
        arm = args.arm
    elif args.block == "none":
        arm = "none"
    else:
        layers = parse_layers(args.layers)
        arm = f"{args.block}:{args.block_direction}" + ("@" + ",".join(map(str, layers)) if layers else "")
    Arm.parse(arm)
    probes = _source(args.prompts, args)
    if probes["path"] != old["probes"]["path"] and Path(probes["path"]).resolve() != Path(old["probes"]["path"]):
        raise ProbeError(
            f"--prompts {args.prompts} is not the probe set {args.direction} was derived on ({old['probes']['path']}); "
            "pass the same --prompts (and --prompt-field / --limit / --chat) as to 'reversion-lens direction'."
        )
    probes = {**old["probes"], **{k: v for k, v in probes.items() if k != "path"}, "path": old["probes"]["path"]}
    params = {**{k: old[k] for k in ("base", "chat", "system", "probe_batch_size") if k in old},
              "aligned": args.model, "probes": probes, "finetune": _source(args.data, args, prompts=False, response_field=args.response_field),
              "lr": args.lr, "optimizer": args.optimizer, "batch_size": args.train_batch_size, "judge": args.judge,
              "max_new_tokens": args.max_new_tokens, "probe_batch_size": args.batch_size, **_placement(args)}  # fmt: skip
    if args.chat != "auto":
        params["chat"] = _chat(args)
    for key, value in (("eval_harmful", args.eval_prompts), ("eval_benign", args.benign_prompts)):
        if value:
            params[key] = _source(value, args, prompts=False)
    if args.heldout:
        params["heldout"] = _source(args.heldout, args, prompts=False, response_field=args.response_field)
    track = ((*tuple(range(args.track_every, args.steps + 1, args.track_every)), args.steps)
             if args.track_every else tuple(s for s in tracking_steps(args.steps) if s > 0))  # fmt: skip
    evals = _steps(args.eval_steps, args.steps, "--eval-steps") or ((0, args.steps) if args.eval_prompts or
                                                                     args.heldout or args.benign_prompts else ())  # fmt: skip
    config = ExperimentConfig(
        setting="hf", params=params, seeds=(args.seed,), arms=(arm,), steps=args.steps, track_steps=track,
        eval_steps=evals, site=dir_cfg.site, direction=dir_cfg.direction, penalty_weight=args.penalty_weight,
        checkpoint_every=args.checkpoint_every, keep_state=args.keep_state, save_model=args.save_model, workers=1,
    )  # fmt: skip
    out = run_experiment(config, args.out, SerialExecutor(), log=_say, reuse=(args.direction,))
    print((out / "summary.md").read_text())
    _say(f"done in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .hf.config import HFConfig
    from .hf.evaluate import make_evaluator
    from .hooks import eval_mode
    from .io import atomic_write_text, write_json
    from .specs import parse_spec

    t0 = time.perf_counter()
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be >= 1.")
    params = {"base": args.model, "aligned": args.model, "probes": _source(args.prompts, args),
              "eval_harmful": _source(args.prompts, args), "chat": _chat(args), "system": args.system,
              "judge": args.judge, "max_new_tokens": args.max_new_tokens, "eval_batch_size": args.batch_size,
              **_placement(args)}  # fmt: skip
    if args.benign:
        params["eval_benign"] = _source(args.benign, args, prompts=False)
    hf = HFConfig.from_params(params)  # every option checked before the model loads
    from .hf.evaluate import check_judge

    check_judge(hf.judge)
    spec = parse_spec(args.model, **{k: v for k, v in _placement(args).items()})
    model = spec.load()
    evaluate = make_evaluator(hf, model)
    with eval_mode(model):
        result = evaluate(model)
    responses = result.pop("responses")
    rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items() if k.endswith("_rate"))
    first = next((r for r in responses if r.get("harmful")), None)
    summary = (
        f"reversion-lens eval: {spec} answered {sum(r['kind'] == 'harmful' for r in responses)} harmful"
        + (f" and {sum(r['kind'] == 'benign' for r in responses)} benign" if args.benign else "")
        + f" prompts (greedy, up to {args.max_new_tokens} new tokens, {args.judge} judge): {rates}."
        + (f" First harmful response: {first['response'].strip()[:80]!r}." if first else "")
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    if args.out is not None:
        atomic_write_text(args.out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in responses))
        write_json(
            args.out / "eval.json", {"model": spec.to_dict(), "rates": result, "argv": sys.argv, "judge": args.judge}
        )
        atomic_write_text(args.out / "summary.txt", summary + "\n")
    print(summary)
    return 0


# ---------------------------------------------------------------------- demo
def _demo(argv: list[str]) -> int:
    try:
        from .toyworld.demo import add_arguments, run
    except ImportError as e:
        print(f"reversion-lens demo: the toy-world demo is not available in this installation ({e}).", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="reversion-lens demo", description="The toy world end to end.")
    add_arguments(p)
    return int(run(p.parse_args(argv)) or 0)


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors in the input: 2, with the fix on stderr)."""
    from .errors import ReversionLensError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "direction": cmd_direction, "track": cmd_track, "eval": cmd_eval}
    try:
        return commands[args.command](args)
    except ReversionLensError as e:
        print(f"reversion-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
