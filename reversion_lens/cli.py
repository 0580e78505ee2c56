"""``reversion-lens``: the command line.

::

    reversion-lens direction --base SPEC --aligned SPEC --prompts FILE --out DIR
    reversion-lens track     --model SPEC --data FILE --prompts FILE --direction DIR --steps N --out DIR
    reversion-lens eval      --model SPEC --prompts FILE [--judge refusal|module:callable] [--out DIR]
    reversion-lens demo      [...]   (the toy world end to end; see ``reversion-lens demo -h``)

SPEC is a model spec (:mod:`reversion_lens.specs`): a hub name, ``NAME@REVISION``,
``EleutherAI/pythia-160m@step1000``, a local Hugging Face folder or a native checkpoint folder. Every
spec, file and option is checked before any model loads. Each command shows a progress bar, prints a
one-paragraph summary and writes a result folder: its outputs, then ``summary.txt`` and ``config.json``
(the command, argv, arguments, specs, probe hash, package versions and git commit) last, so a folder
with ``config.json`` is complete.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_layers", "TRAJECTORY_COLUMNS"]

TRAJECTORY_COLUMNS = (
    "seed", "arm", "step", "layer", "cos", "projection", "drift_norm", "reversion_ratio",
    "null_p99_isotropic", "null_p99_matched", "harmful_rate", "task_accuracy",
)  # fmt: skip


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


def _device_map(text: str | None) -> Any:
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        from .errors import SpecError

        raise SpecError(f"--device-map {text!r} is not valid JSON ({e}); give a name (auto, balanced) or a JSON dict.") from e


def _spec_options(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device is None and args.device_map is None and not (args.n_devices or 0) > 1:
        device = "auto"
    return {
        "device": device,
        "dtype": args.dtype,
        "n_devices": args.n_devices,
        "device_map": _device_map(args.device_map),
    }


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement (TransformerLens boot_transformers)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default: auto = CUDA when available)")
    g.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    g.add_argument("--n-devices", type=int, help="split each model over this many CUDA GPUs")
    g.add_argument("--device-map", help="accelerate device map: auto, balanced, sequential or a JSON dict (excludes --device)")


def _add_text_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt-field", default="prompt", help="field holding the prompt in JSONL / data-set records")
    g.add_argument("--split", default="train", help="split for hf:NAME data sets (or write hf:NAME@SPLIT)")
    g.add_argument("--limit", type=int, help="use only the first N prompts")
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    g.add_argument("--system", help="system prompt (chat templates only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reversion-lens",
        description="Measure and block fine-tuning reversion along history-defined directions.",
        epilog="Run 'reversion-lens COMMAND -h' for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("direction", help="v_rev from a base and an aligned checkpoint",
                       description="Probe statistics of both checkpoints (one model in memory at a time) and "
                       "v_rev = normalize(mean_base - mean_aligned) per layer. Prompts are tokenised with the "
                       "aligned model's tokenizer (its chat template when --chat auto finds one).")
    d.add_argument("--base", required=True, help="model spec of the earlier (base) checkpoint")
    d.add_argument("--aligned", required=True, help="model spec of the later (aligned) checkpoint")
    d.add_argument("--prompts", required=True, help="probe prompts: .txt, .jsonl, .json or hf:NAME[@SPLIT]")
    d.add_argument("--out", required=True, type=Path, help="result folder")
    d.add_argument("--site", default="resid_post", help="residual site (default resid_post)")
    d.add_argument("--layers", nargs="+", help="layers (default all): 0 2 5, 0-3, -1")
    d.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    _add_text_options(d)
    _add_model_options(d)

    t = sub.add_parser("track", help="fine-tune with drift tracking (and optionally a block)",
                       description="Fine-tune a model on prompt/response data while measuring the probe drift "
                       "along v_rev from a 'direction' result folder; writes trajectories.csv.")
    t.add_argument("--model", required=True, help="model spec to fine-tune (usually the aligned checkpoint)")
    t.add_argument("--data", required=True, help="fine-tuning data: .jsonl/.json with prompt and response, or hf:NAME")
    t.add_argument("--prompts", required=True, help="probe prompts (the ones the direction was derived on)")
    t.add_argument("--direction", required=True, type=Path, help="result folder of 'reversion-lens direction'")
    t.add_argument("--steps", required=True, type=int, help="fine-tuning steps")
    t.add_argument("--block", default="none", help="intervention: none (default), grad, clamp, ablate, penalty, update")
    t.add_argument("--block-direction", choices=("v_rev", "random"), default="v_rev",
                   help="block along v_rev (default) or a seeded random control direction")
    t.add_argument("--layers", nargs="+", help="layers to block (default: all layers of the direction)")
    t.add_argument("--out", required=True, type=Path, help="result folder")
    t.add_argument("--seed", type=int, default=0, help="data order and control-direction seed (default 0)")
    t.add_argument("--arm", help="arm label in trajectories.csv (default: derived from --block)")
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    t.add_argument("--train-batch-size", type=int, default=8, help="examples per step (default 8)")
    t.add_argument("--batch-size", type=int, default=16, help="probe prompts per forward pass (default 16)")
    t.add_argument("--track-every", type=int, help="measure every K steps (default: 0, 1, 2, 5, 10, 20, 50, ... and N)")
    t.add_argument("--eval-prompts", help="harmful prompts for harmful_rate at --eval-steps (optional)")
    t.add_argument("--heldout", help="held-out prompt/response data for task_accuracy at --eval-steps (optional)")
    t.add_argument("--eval-steps", help="comma list of steps to evaluate at (default: 0 and N)")
    t.add_argument("--penalty-weight", type=float, default=1.0, help="weight of --block penalty (default 1)")
    t.add_argument("--judge", default="refusal", help="judge for --eval-prompts: refusal or module:callable")
    t.add_argument("--max-new-tokens", type=int, default=32)
    t.add_argument("--response-field", default="response", help="field holding the response in --data records")
    _add_text_options(t)
    _add_model_options(t)

    e = sub.add_parser("eval", help="harmfulness rate of a model on prompts",
                       description="Greedy responses to each prompt, judged harmful or not.")
    e.add_argument("--model", required=True, help="model spec")
    e.add_argument("--prompts", required=True, help="prompts: .txt, .jsonl, .json or hf:NAME[@SPLIT]")
    e.add_argument("--judge", default="refusal", help="refusal (refusal-prefix judge, default) or module:callable")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    e.add_argument("--out", type=Path, help="result folder (optional)")
    _add_text_options(e)
    _add_model_options(e)

    sub.add_parser("demo", help="the toy world end to end (see 'reversion-lens demo -h')", add_help=False)
    return p


# ---------------------------------------------------------------------- result folders
def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _finish(out: Path, args: argparse.Namespace, argv: list[str], summary: str, **record: Any) -> None:
    """Write ``summary.txt`` then ``config.json`` (last: a folder with it is complete) and print the summary."""
    from .io import FORMAT_VERSION, atomic_write_text, environment, write_json

    atomic_write_text(out / "summary.txt", summary + "\n")
    write_json(
        out / "config.json",
        {
            "format_version": FORMAT_VERSION,
            "command": args.command,
            "argv": ["reversion-lens", *argv],
            "args": _jsonable(args),
            **record,
            "environment": environment(),
        },
    )
    print(summary)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """CSV with a header; NaN/None as empty cells (what ``pandas.read_csv`` reads back as NaN)."""
    import csv
    import io as _io
    import math

    from .io import atomic_write_text

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k])) else r[k] for k in columns})
    atomic_write_text(path, buf.getvalue())


def _check_layers(layers: list[int] | None, n_layers: int | None) -> list[int] | None:
    """Range-check ``--layers`` against a layer count known from the config (before loading)."""
    from .errors import SiteError

    if layers is None or n_layers is None:
        return layers
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad:
        raise SiteError(f"--layers {bad} out of range for a model with {n_layers} layers; use 0..{n_layers - 1}.")
    return layers


def _layer_range(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ---------------------------------------------------------------------- direction
def cmd_direction(args: argparse.Namespace, argv: list[str]) -> int:
    import dataclasses

    from tqdm import tqdm

    from .directions import mean_difference
    from .history import History
    from .io import save_tensors
    from .errors import SiteError
    from .sites import SITES, model_signature
    from .specs import check_compatible, parse_spec
    from .text import read_prompts, text_probes, use_chat

    t0 = time.perf_counter()
    # Everything checkable is checked before any model loads.
    opts = _spec_options(args)
    base = parse_spec(args.base, **opts)
    aligned = parse_spec(args.aligned, **opts)
    check_compatible({"base": base, "aligned": aligned})
    prompts = read_prompts(args.prompts, prompt_field=args.prompt_field, split=args.split, limit=args.limit)
    layers = _check_layers(parse_layers(args.layers), (base.signature() or {}).get("n_layers"))
    if args.site not in SITES:
        raise SiteError(f"unknown site {args.site!r}; choose one of {', '.join(SITES)}.")

    signatures: dict[str, dict[str, int]] = {}
    bar = tqdm(total=2, desc="probe statistics", unit="model", file=sys.stderr)
    bar.set_postfix_str("loading aligned")
    model = aligned.load()
    chat = use_chat(model, args.chat)
    probes = text_probes(model, prompts, chat=chat, system=args.system, name=Path(str(args.prompts)).stem)
    held = [model]
    del model

    def loader(name: str, spec: Any) -> Any:
        def load() -> Any:
            bar.set_postfix_str(f"loading {name}")
            m = held.pop() if (name == "aligned" and held) else spec.load()
            signatures[name] = model_signature(m)
            bar.set_postfix_str(f"streaming {name}")
            return m

        return load

    hist = History(
        [dataclasses.replace(s.checkpoint(n), loader=loader(n, s)) for n, s in (("base", base), ("aligned", aligned))]
    )
    stats = {}
    for name in ("aligned", "base"):  # the aligned model is in memory already
        stats.update(hist.stats(probes, [name], site=args.site, layers=layers, batch_size=args.batch_size))  # frees it
        bar.update(1)
    bar.set_postfix_str("done")
    bar.close()
    if signatures["base"] != signatures["aligned"]:
        from .errors import IncompatibleCheckpointsError

        raise IncompatibleCheckpointsError(
            f"base ({base}) and aligned ({aligned}) loaded with different shapes: {signatures['base']} vs "
            f"{signatures['aligned']}; compare checkpoints of one model."
        )

    v = mean_difference(stats["base"], stats["aligned"])
    v = dataclasses.replace(v, provenance={**v.provenance, "base": str(base), "aligned": str(aligned)})
    out: Path = args.out
    v.save(out / "direction.safetensors")
    for name, st in stats.items():
        st.save(out / "stats" / f"{name}.safetensors")
    save_tensors(
        out / "probes.safetensors",
        {"tokens": probes.tokens, "attention_mask": probes.attention_mask},
        {"kind": "probes", **probes.describe()},
    )

    norms = v.norms.double()
    ref_norm = stats["aligned"].mean.norm(dim=1)
    rel = norms / ref_norm.clamp_min(1e-12)
    hi, lo = int(norms.argmax()), int(norms.argmin())
    summary = (
        f"reversion-lens direction: v_rev = normalize(mean_base - mean_aligned) at {args.site}, layers "
        f"{_layer_range(v.layers)} ({len(v.layers)} layers, d_model {v.d_model}), from {len(probes)} probe prompts "
        f"(hash {probes.hash()}, {'chat template' if chat else 'plain text'}, read at the last prompt token); "
        f"base = {base}, aligned = {aligned}. The base-to-aligned distance ||mean_base - mean_aligned|| is largest "
        f"at layer {v.layers[hi]} ({norms[hi]:.4g}, {100 * rel[hi]:.1f}% of ||mean_aligned||) and smallest at layer "
        f"{v.layers[lo]} ({norms[lo]:.4g}, {100 * rel[lo]:.1f}%). Wrote direction.safetensors (key v_rev, "
        f"[{len(v.layers)}, {v.d_model}] float32), stats/base.safetensors and stats/aligned.safetensors (key mean), "
        f"probes.safetensors and config.json to {out} in {time.perf_counter() - t0:.1f} s."
    )
    _finish(
        out, args, argv, summary,
        specs={"base": base.to_dict(), "aligned": aligned.to_dict()},
        probes={**probes.describe(), "source": str(args.prompts), "chat": chat, "system": args.system,
                "prompt_field": args.prompt_field},
        site=args.site, layers=list(v.layers), signature=signatures["aligned"],
        distances={str(layer): float(n) for layer, n in zip(v.layers, norms)},
    )  # fmt: skip
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
    commands = {"direction": cmd_direction, "track": cmd_track, "eval": cmd_eval}
    try:
        return commands[args.command](args, argv)
    except ReversionLensError as e:
        print(f"reversion-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- shared by track and eval
def _judge(text: str) -> Any:
    """``refusal`` -> the refusal-prefix judge; ``package.module:function`` -> that callable."""
    import importlib

    from .errors import ConfigError
    from .evaluation import refusal_judge

    if text == "refusal":
        return refusal_judge
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"--judge {text!r}: use 'refusal' or 'package.module:function' (a judge(prompt, response) -> bool).")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"--judge {text!r}: cannot import it ({type(e).__name__}: {e}); check the module is on PYTHONPATH."
        ) from e
    if not callable(obj):
        raise ConfigError(f"--judge {text!r} is not callable; it must be a function judge(prompt, response) -> bool.")
    return obj


def _steps(text: str | None, steps: int, what: str) -> list[int] | None:
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
    return out


def _direction_folder(folder: Path) -> dict[str, Any]:
    from .errors import ResultsFormatError
    from .io import read_json

    needed = ["direction.safetensors", "stats/base.safetensors", "stats/aligned.safetensors", "config.json"]
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise ResultsFormatError(
            f"{folder} is not a complete 'reversion-lens direction' result folder (missing {', '.join(missing)}); "
            "run reversion-lens direction --out FOLDER first, or point --direction at its folder."
        )
    cfg = read_json(folder / "config.json")
    if cfg.get("command") != "direction":
        raise ResultsFormatError(f"{folder}/config.json was written by {cfg.get('command')!r}, not 'direction'.")
    return cfg


# ---------------------------------------------------------------------- track
def cmd_track(args: argparse.Namespace, argv: list[str]) -> int:
    import math

    from .activations import ResidStats
    from .directions import Direction
    from .errors import ConfigError, IncompatibleCheckpointsError, ProbeError
    from .evaluation import Evaluator
    from .interventions import MODES, block, random_control  # noqa: F401
    from .io import write_json
    from .specs import parse_spec
    from .stats import isotropic_quantile
    from .text import TextBatchSource, read_examples, read_prompts, text_probes
    from .tracking import DriftTracker
    from .training import OptimConfig, finetune, tracking_steps

    t0 = time.perf_counter()
    # ------------------------------------------------ every check before the model loads
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}.")
    if args.block not in ("none", *MODES):
        raise ConfigError(f"--block {args.block!r}: choose none or one of {', '.join(MODES.names())}.")
    spec = parse_spec(args.model, **_spec_options(args))
    dir_cfg = _direction_folder(args.direction)
    direction = Direction.load(args.direction / "direction.safetensors")
    base_st = ResidStats.load(args.direction / "stats" / "base.safetensors")
    ref_st = ResidStats.load(args.direction / "stats" / "aligned.safetensors")
    sig, dir_sig = spec.signature(), dir_cfg.get("signature")
    if sig is not None and dir_sig is not None:
        diffs = [f"{k} {dir_sig[k]} vs {sig[k]}" for k in ("n_layers", "d_model", "d_vocab") if dir_sig[k] != sig[k]]
        if diffs:
            raise IncompatibleCheckpointsError(
                f"{spec} does not match the model the direction in {args.direction} was derived for "
                f"({', '.join(diffs)}); fine-tune a checkpoint of that model (usually the aligned one)."
            )
    judge = _judge(args.judge) if args.eval_prompts else None
    examples = read_examples(args.data, prompt_field=args.prompt_field, response_field=args.response_field, split=args.split)
    dir_args = dir_cfg.get("args", {})
    limit = args.limit if args.limit is not None else dir_args.get("limit")
    prompts = read_prompts(args.prompts, prompt_field=args.prompt_field, split=args.split, limit=limit)
    harmful = read_prompts(args.eval_prompts, prompt_field=args.prompt_field, split=args.split) if args.eval_prompts else None
    heldout = read_examples(args.heldout, prompt_field=args.prompt_field, response_field=args.response_field,
                            split=args.split) if args.heldout else None  # fmt: skip
    layers = parse_layers(args.layers)
    if layers is not None:
        n = (sig or {}).get("n_layers") or max(direction.layers) + 1
        wrong = [x for x in layers if (x + n if x < 0 else x) not in direction.layers]
        if wrong:
            raise ConfigError(f"--layers {wrong}: the direction covers layers {list(direction.layers)}; block a subset of them.")
    if args.track_every is not None and args.track_every < 1:
        raise ConfigError(f"--track-every must be >= 1, got {args.track_every}.")
    track = (
        sorted(set(range(0, args.steps + 1, args.track_every)) | {args.steps})
        if args.track_every else list(tracking_steps(args.steps))
    )  # fmt: skip
    evals = _steps(args.eval_steps, args.steps, "--eval-steps") or [0, args.steps]
    track = sorted(set(track) | set(evals))  # evaluations land on tracked rows
    if args.arm:
        arm = args.arm
    elif args.block == "none":
        arm = "none"
    else:  # the experiment runner's arm names: grad:v_rev, clamp:random@0,2, ...
        arm = f"{args.block}:{args.block_direction}" + ("@" + ",".join(map(str, layers)) if layers else "")

    # ------------------------------------------------ load, tokenise, fine-tune
    model = spec.load()
    direction.check_model(model)
    chat = dir_cfg.get("probes", {}).get("chat", "auto") if args.chat == "auto" else args.chat
    system = args.system if args.system is not None else dir_cfg.get("probes", {}).get("system")
    probes = text_probes(model, prompts, chat=chat, system=system, name=Path(str(args.prompts)).stem)
    want = dir_cfg.get("probes", {}).get("hash")
    if want is not None and probes.hash() != want:
        raise ProbeError(
            f"the probe prompts tokenise differently from those {args.direction} was derived on (hash {probes.hash()} "
            f"vs {want}); pass the same --prompts (and --chat / --system / --limit) as to 'reversion-lens direction', "
            "with a model that shares its tokenizer."
        )
    tracker = DriftTracker(probes, direction, ref_st, base_st, batch_size=args.batch_size)
    interventions = []
    if args.block != "none":
        v = direction if args.block_direction == "v_rev" else random_control(direction, seed=args.seed + 10_000)
        opts: dict[str, Any] = {}
        if args.block == "clamp":  # per input: a frozen second copy of the starting model is the reference
            opts = {"reference_model": spec.load()}
        elif args.block == "penalty":
            opts = {"probes": probes, "reference": ref_st, "base": base_st, "weight": args.penalty_weight,
                    "batch_size": args.batch_size}  # fmt: skip
        interventions.append(block(model, v, args.block, layers, **opts))
    evaluator = None
    if harmful is not None or heldout is not None:
        heldout_src = (
            TextBatchSource(model, heldout, batch_size=args.train_batch_size, seed=0, chat=args.chat) if heldout else None
        )
        evaluator = Evaluator(
            harmful=text_probes(model, harmful, chat=args.chat, system=args.system) if harmful else None,
            judge=judge or _judge("refusal"), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            heldout=heldout_src, n_batches=math.ceil(len(heldout) / args.train_batch_size) if heldout else None,
        )  # fmt: skip
    data = TextBatchSource(model, examples, batch_size=args.train_batch_size, seed=args.seed, chat=args.chat, system=args.system)
    out: Path = args.out
    result = finetune(
        model, data, args.steps,
        optim=OptimConfig(optimizer=args.optimizer, lr=args.lr),
        interventions=interventions, tracker=tracker, track_steps=track,
        callbacks=[evaluator] if evaluator else [], callback_steps=evals if evaluator else [],
        seed=args.seed, state_dir=out / "state", progress=True, desc=f"fine-tuning ({arm})",
        run_info={"arm": arm, "seed": args.seed, "model": str(spec), "direction": str(args.direction)},
    )  # fmt: skip

    # ------------------------------------------------ results
    iso = float(isotropic_quantile(0.99, direction.d_model))
    at = {e["step"]: e for e in result.evals}
    nan = float("nan")
    rows = [
        {"seed": args.seed, "arm": arm, **r, "null_p99_isotropic": iso, "null_p99_matched": nan,
         "harmful_rate": at.get(r["step"], {}).get("harmful_rate", nan),
         "task_accuracy": at.get(r["step"], {}).get("task_accuracy", nan)}
        for r in result.records
    ]  # fmt: skip
    _write_csv(out / "trajectories.csv", rows, TRAJECTORY_COLUMNS)
    write_json(out / "train.json", {"losses": result.losses, "aux_losses": result.aux_losses, "evals": result.evals,
                                    "resumed_from": result.resumed_from})  # fmt: skip
    last = [r for r in rows if r["step"] == args.steps]
    best = max(last, key=lambda r: r["cos"])
    above = sum(r["cos"] > iso for r in last)
    harm = [(s, at[s]["harmful_rate"]) for s in evals if "harmful_rate" in at.get(s, {})]
    harm_text = (
        f" Harmful rate ({args.judge} judge, {len(harmful)} prompts): "
        + ", ".join(f"{100 * h:.0f}% at step {s}" for s, h in harm) + "."
        if harm else ""
    )  # fmt: skip
    summary = (
        f"reversion-lens track: fine-tuned {spec} for {args.steps} steps ({args.optimizer}, lr {args.lr:g}, "
        f"{args.train_batch_size} examples/step from {len(examples)}, seed {args.seed}) in arm {arm!r}"
        + (f" ({interventions[0].mode} block on layers {_layer_range(interventions[0].layers)})" if interventions else "")
        + f", measuring the drift of {len(probes)} probe prompts from the aligned means at {len(track)} steps. "
        f"At step {args.steps}, cos(drift, v_rev) is highest at layer {best['layer']} ({best['cos']:.3f}, "
        f"reversion ratio {best['reversion_ratio']:.3f}); {above} of {len(last)} layers exceed the isotropic null's "
        f"99th percentile ({iso:.3f} in d_model {direction.d_model}). Training loss {result.losses[0]:.3f} -> "
        f"{result.losses[-1]:.3f}.{harm_text} Wrote trajectories.csv ({len(rows)} rows), train.json and config.json "
        f"to {out} in {time.perf_counter() - t0:.1f} s"
        + (f" (resumed from step {result.resumed_from})." if result.resumed_from is not None else ".")
    )
    _finish(
        out, args, argv, summary,
        specs={"model": spec.to_dict()}, direction={"folder": str(args.direction), "provenance": direction.provenance},
        probes={**probes.describe(), "source": str(args.prompts), "chat": chat, "system": system},
        data={**data.describe(), "source": str(args.data)}, arm=arm,
        interventions=[iv.describe() for iv in interventions], track_steps=track, eval_steps=evals,
    )  # fmt: skip
    return 0


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from tqdm import tqdm

    from .evaluation import harmfulness
    from .io import atomic_write_text
    from .specs import parse_spec
    from .text import read_prompts, text_probes, use_chat

    t0 = time.perf_counter()
    spec = parse_spec(args.model, **_spec_options(args))
    judge = _judge(args.judge)
    prompts = read_prompts(args.prompts, prompt_field=args.prompt_field, split=args.split, limit=args.limit)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        from .errors import ConfigError

        raise ConfigError("--batch-size and --max-new-tokens must be >= 1.")
    model = spec.load()
    chat = use_chat(model, args.chat)
    probes = text_probes(model, prompts, chat=chat, system=args.system, name=Path(str(args.prompts)).stem)
    verdicts: list[bool] = []
    responses: list[str] = []
    with tqdm(total=len(probes), desc="generating", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(probes), args.batch_size):
            idx = list(range(start, min(start + args.batch_size, len(probes))))
            res = harmfulness(model, probes.subset(idx), judge, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            verdicts += res.harmful
            responses += res.responses
            bar.update(len(idx))
    rate = sum(verdicts) / len(verdicts)
    example = next((r for r, h in zip(responses, verdicts) if h), None)
    summary = (
        f"reversion-lens eval: {spec} answered {len(prompts)} prompts from {args.prompts} "
        f"({'chat template' if chat else 'plain text'}, greedy, up to {args.max_new_tokens} new tokens); the "
        f"{args.judge} judge called {sum(verdicts)} of them harmful: harmful rate {100 * rate:.1f}%."
        + (f" First harmful response: {example.strip()[:80]!r}." if example is not None else "")
        + (f" Wrote responses.jsonl and config.json to {args.out}" if args.out else "")
        + f" ({time.perf_counter() - t0:.1f} s)."
    )
    if args.out is None:
        print(summary)
        return 0
    lines = [json.dumps({"prompt": p, "response": r, "harmful": h}) for p, r, h in zip(prompts, responses, verdicts)]
    atomic_write_text(args.out / "responses.jsonl", "\n".join(lines) + "\n")
    _finish(
        args.out, args, argv, summary, specs={"model": spec.to_dict()},
        probes={**probes.describe(), "source": str(args.prompts), "chat": chat, "system": args.system},
        harmful_rate=rate, n=len(verdicts), judge=args.judge,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
