"""The whole pipeline on a GPT-2-small-sized model on one GPU: derive v_rev, then fine-tune with tracking,
with and without the ``grad`` block; tokens per second and peak GPU memory.

::

    python benchmarks/gpu_reversion.py                                  # offline: a random GPT-2-small-sized pair
    python benchmarks/gpu_reversion.py --base EleutherAI/pythia-160m@step100000 --aligned EleutherAI/pythia-160m
    python benchmarks/gpu_reversion.py --device cpu --small --steps 5   # CPU smoke test (well under 2 minutes)

1. Models. With ``--base SPEC --aligned SPEC`` (any :mod:`reversion_lens.specs` spec: hub names with hub
   access, local folders) that pair. Without, offline: a random-weight native model (12 layers, d_model
   768, 12 heads, vocabulary 50257, ``--small``: 4 x 128) as ``base`` and a copy with every weight moved by
   ``--perturb`` (10%) of its RMS as ``aligned``, both saved with ``models.save_native`` into a temporary
   folder and loaded back through ``specs.parse_spec`` like any checkpoint.
2. Direction: probe statistics of both checkpoints (``specs.make_history(...).stats``), v_rev by
   ``directions.mean_difference`` at ``resid_post`` of every layer.
3. Timed, each from the aligned weights on the same batches (``--steps`` of ``--batch`` x ``--seq`` random
   tokens, or ``--data``/``--prompts`` text): the forward pass alone (inference mode, logits: the limit),
   plain ``training.finetune``, ``finetune`` with a ``tracking.DriftTracker`` at ``training.tracking_steps``,
   and the same with ``interventions.block(model, v, "grad")`` on every layer. tokens/s counts the training
   tokens (attention mask); the tracker's probe passes are the overhead being measured.

Weights and activations are in ``--dtype`` (bfloat16) as ``parse_spec(dtype=...)`` loads them, with AdamW
on them directly (pure bf16: updates below bf16 resolution are lost, which does not change the speed).
``--autocast`` loads float32 weights and runs every phase under ``torch.autocast(dtype=bfloat16)`` instead.
Timing: CUDA events after ``torch.cuda.synchronize()`` on a GPU; process CPU time on CPU (PERFORMANCE.md).
One warm-up pass of each variant (``--warmup`` steps) precedes the timed rounds; variants rotate order
across ``--rounds`` and the median is reported. Peak memory is ``torch.cuda.max_memory_allocated`` per
variant (reset before each).
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reversion_lens.directions import mean_difference
from reversion_lens.interventions import block
from reversion_lens.models import boot_native, save_native
from reversion_lens.probes import ProbeSet
from reversion_lens.specs import make_history, parse_spec
from reversion_lens.tracking import DriftTracker
from reversion_lens.training import Batch, OptimConfig, finetune, tracking_steps

SIZES = {
    "gpt2-small": dict(d_model=768, d_head=64, n_layers=12, n_ctx=1024, d_vocab=50257, act_fn="gelu_new"),
    "small": dict(d_model=128, d_head=32, n_layers=4, n_ctx=64, d_vocab=50257, act_fn="gelu_new"),
}
VARIANTS = ("forward only (the limit)", "plain fine-tuning", "tracked fine-tuning", "tracked + grad block")


class RandomTokens:
    """Fine-tuning batches of uniform random tokens, a deterministic function of ``(seed, step)``."""

    def __init__(self, d_vocab: int, batch: int, seq: int, seed: int = 0):
        self.d_vocab, self.batch_size, self.seq, self.seed = d_vocab, batch, seq, seed

    def batch(self, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        toks = torch.randint(0, self.d_vocab, (self.batch_size, self.seq), generator=g)
        return Batch(toks, torch.ones_like(toks), torch.ones_like(toks))

    def describe(self) -> dict[str, Any]:
        return {"random_tokens": [self.batch_size, self.seq], "seed": self.seed}


# ---------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, fn())``: CUDA events around ``fn`` on a GPU, process CPU time otherwise."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0, out
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def wall(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------- models and data
def offline_pair(folder: Path, size: str, perturb: float, seed: int) -> tuple[str, str]:
    """A random ``base`` and a perturbed ``aligned`` native checkpoint in ``folder``; returns their paths."""
    base = boot_native({**SIZES[size], "seed": seed})
    save_native(base, folder / "base")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in base.parameters():
            rms = p.float().pow(2).mean().sqrt()
            p.add_(perturb * rms * torch.randn(p.shape, generator=g, dtype=p.dtype))
    save_native(base, folder / "aligned")
    return str(folder / "base"), str(folder / "aligned")


def probes_and_data(model: Any, args: argparse.Namespace) -> tuple[ProbeSet, Any]:
    if args.prompts:
        from reversion_lens.text import read_prompts, text_probes

        probes = text_probes(model, read_prompts(args.prompts, limit=args.n_probes), name=Path(args.prompts).stem)
    else:
        g = torch.Generator().manual_seed(args.seed + 7)
        probes = ProbeSet.from_tokens(
            torch.randint(0, int(model.cfg.d_vocab), (args.n_probes, args.probe_len), generator=g)
        )
    if args.data:
        from reversion_lens.text import TextBatchSource, read_examples

        data = TextBatchSource(model, read_examples(args.data), batch_size=args.batch, seed=args.seed, max_len=args.seq)
    else:
        data = RandomTokens(int(model.cfg.d_vocab), args.batch, args.seq, args.seed)
    return probes, data


# ---------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    if (args.base is None) != (args.aligned is None):
        sys.exit("give both --base and --aligned, or neither (a random offline pair).")
    device_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    if device.type == "cuda" and torch.cuda.device_count() == 0:
        sys.exit(f"--device {args.device}: this machine has no CUDA device; use --device cpu.")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    weight_dtype = "float32" if args.autocast else args.dtype
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext
    size = "small" if args.small else "gpt2-small"

    with tempfile.TemporaryDirectory(prefix="gpu_reversion_") as tmp:
        base_src, aligned_src = (
            (args.base, args.aligned) if args.base else offline_pair(Path(tmp), size, args.perturb, args.seed)
        )
        base_spec = parse_spec(base_src, device=device_name, dtype=weight_dtype)
        aligned_spec = parse_spec(aligned_src, device=device_name, dtype=weight_dtype)  # checks the device exists
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)  # CUDA events record on the current device's stream
        model = aligned_spec.load()  # the model to fine-tune; its tokenizer (if any) builds the probes and data
        n_ctx = int(model.cfg.n_ctx)
        if max(args.seq, args.probe_len) > n_ctx:
            sys.exit(
                f"--seq {args.seq} / --probe-len {args.probe_len}: the model's context is {n_ctx} tokens; use at most that."
            )
        probes, data = probes_and_data(model, args)
        hist = make_history({"base": base_spec, "aligned": aligned_spec})

        def derive() -> Any:
            with amp():
                return hist.stats(probes, ["base", "aligned"], batch_size=args.probe_batch)

        derive_s, stats = wall(derive, device)
    v = mean_difference(stats["base"], stats["aligned"])
    ref, base = stats["aligned"], stats["base"]

    state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    optim = OptimConfig(lr=args.lr)
    track = tracking_steps(args.steps)
    batches = [data.batch(s) for s in range(args.steps)]
    train_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))

    def forward_only(steps: int) -> None:
        with torch.inference_mode(), amp():
            for b in batches[:steps]:
                model(b.tokens.to(device), attention_mask=b.attention_mask.to(device))

    def tune(steps: int, tracked: bool, grad: bool) -> Any:
        tracker = DriftTracker(probes, v, ref, base, batch_size=args.probe_batch) if tracked else None
        ivs = [block(model, v, "grad")] if grad else []
        with amp():
            finetune(model, data, steps, optim=optim, tracker=tracker, interventions=ivs,
                     track_steps=tracking_steps(steps), progress=False)  # fmt: skip
        return tracker

    runs: dict[str, Callable[[int], Any]] = {
        VARIANTS[0]: forward_only,
        VARIANTS[1]: lambda n: tune(n, False, False),
        VARIANTS[2]: lambda n: tune(n, True, False),
        VARIANTS[3]: lambda n: tune(n, True, True),
    }
    for fn in runs.values():  # warm-up: kernels, allocator, autotuning
        model.load_state_dict(state)
        fn(min(args.warmup, args.steps))
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    peak: dict[str, int | None] = {k: None for k in runs}
    trackers: dict[str, Any] = {}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model.load_state_dict(state)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            s, out = timed(lambda name=name: runs[name](args.steps), device)
            seconds[name].append(s)
            if device.type == "cuda":
                peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated(device))
            if out is not None:
                trackers[name] = out
            print(f"  round {r + 1}/{args.rounds}: {name}: {s:.3f} s", file=sys.stderr, flush=True)

    med = {k: statistics.median(ts) for k, ts in seconds.items()}
    plain, fwd = med[VARIANTS[1]], med[VARIANTS[0]]
    rows = {}
    for name in names:
        last = [r for r in trackers[name].records if r["step"] == args.steps] if name in trackers else []
        rows[name] = {
            "seconds": med[name], "seconds_all": seconds[name], "tokens_per_s": train_tokens / med[name],
            "time_vs_plain": med[name] / plain, "time_vs_forward": med[name] / fwd, "peak_bytes": peak[name],
            "cos_at_last_step": statistics.fmean(r["cos"] for r in last) if last else None,
            "reversion_ratio_at_last_step": statistics.fmean(r["reversion_ratio"] for r in last) if last else None,
        }  # fmt: skip
    return {
        "setup": {
            "base": str(base_spec) if args.base else f"random native {size} (seed {args.seed})",
            "aligned": str(aligned_spec) if args.base else f"base + {args.perturb:g} x RMS noise",
            "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model),
            "d_vocab": int(model.cfg.d_vocab),
            "device": device_name,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "weights": weight_dtype,
            "autocast_bf16": args.autocast,
            "timer": "cuda events"
            if device.type == "cuda"
            else f"process CPU time, {torch.get_num_threads()} thread(s)",
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "train_tokens": train_tokens,
            "track_steps": list(track),
            "probes": [len(probes), int(probes.tokens.shape[1])],
            "rounds": args.rounds,
            "warmup": args.warmup,
            "optim": optim.to_dict(),
            "torch": torch.__version__,
            "weights_bytes": weights_bytes,
        },
        "direction": {"seconds_wall": derive_s, "layers": list(v.layers), "norms": [float(x) for x in v.norms]},
        "variants": rows,
    }


def print_report(res: dict[str, Any]) -> None:
    s = res["setup"]
    where = s["gpu"] or s["device"]
    print(f"\n{s['n_layers']} layers x d_model {s['d_model']}, vocab {s['d_vocab']}; "
          f"base = {s['base']}, aligned = {s['aligned']}")  # fmt: skip
    print(f"{where}, {s['weights']} weights{' + bf16 autocast' if s['autocast_bf16'] else ''}, timer: {s['timer']}; "
          f"{s['steps']} AdamW steps of {s['batch']} x {s['seq']} tokens ({s['train_tokens']} training tokens); "
          f"tracker at {len(s['track_steps'])} steps on {s['probes'][0]} probes x {s['probes'][1]} tokens; "
          f"median of {s['rounds']} round(s)")  # fmt: skip
    print(f"direction (probe statistics of both checkpoints): {res['direction']['seconds_wall']:.2f} s wall")
    head = (f"{'variant':<26} {'seconds':>9} {'tokens/s':>11} {'time/plain':>10} {'time/fwd':>8} {'peak MiB':>9} "
            f"{'cos@T':>7} {'ratio@T':>8}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for name, r in res["variants"].items():
        peak = f"{r['peak_bytes'] / 2**20:9.0f}" if r["peak_bytes"] is not None else f"{'n/a':>9}"
        cos = f"{r['cos_at_last_step']:7.3f}" if r["cos_at_last_step"] is not None else f"{'':>7}"
        rr = (
            f"{r['reversion_ratio_at_last_step']:8.4f}" if r["reversion_ratio_at_last_step"] is not None else f"{'':>8}"
        )
        print(f"{name:<26} {r['seconds']:9.3f} {r['tokens_per_s']:11.0f} {r['time_vs_plain']:10.3f} "
              f"{r['time_vs_forward']:8.3f} {peak} {cos} {rr}")  # fmt: skip
    tracked, blocked = res["variants"][VARIANTS[2]], res["variants"][VARIANTS[3]]
    print(
        f"tracked fine-tuning runs at {1 / tracked['time_vs_plain']:.3f}x the plain tokens/s and "
        f"{1 / tracked['time_vs_forward']:.3f}x the forward-only tokens/s; with the grad block "
        f"{1 / blocked['time_vs_plain']:.3f}x and {1 / blocked['time_vs_forward']:.3f}x. "
        "cos@T / ratio@T: mean over layers of cos(drift, v_rev) and the reversion ratio after the last step."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model spec (with --aligned); default: an offline random pair")
    p.add_argument("--aligned", help="aligned model spec (the one fine-tuned)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default)")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations (default bfloat16)")
    p.add_argument("--autocast", action="store_true", help="float32 weights, bf16 autocast")
    p.add_argument("--small", action="store_true", help="4 layers, d_model 128, smaller batches (smoke test)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, help="examples per step (default 16; --small 4)")
    p.add_argument("--seq", type=int, help="tokens per example (default 512; --small 32)")
    p.add_argument("--n-probes", type=int, help="probe prompts (default 128; --small 16)")
    p.add_argument("--probe-len", type=int, help="tokens per random probe (default 64; --small 16)")
    p.add_argument("--probe-batch", type=int, default=32)
    p.add_argument("--prompts", help="probe prompts file (text probes; needs a model with a tokenizer)")
    p.add_argument("--data", help="fine-tuning examples .jsonl (prompt/response; needs a tokenizer)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--perturb", type=float, default=0.1, help="offline pair: aligned = base + this x RMS noise")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    small = args.small
    for name, full, tiny in (("batch", 16, 4), ("seq", 512, 32), ("n_probes", 128, 16), ("probe_len", 64, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    t0 = time.perf_counter()
    res = run(args)
    res["setup"]["total_seconds_wall"] = time.perf_counter() - t0
    print_report(res)
    print(f"total wall time {res['setup']['total_seconds_wall']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
