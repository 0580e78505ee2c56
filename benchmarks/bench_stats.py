"""Residual statistics against the forward-pass limit and against run_with_cache.

GPT-2-small-sized random model (12 layers, d_model 768, vocabulary 50257), 32 prompts x 64 tokens,
one torch thread, process CPU time, variants round-robin, ratios within a round (see _timing.py):

    python benchmarks/bench_stats.py [--rounds 5] [--prompts 32] [--small]

Goals (issue 2): our statistics <= 1.05x the body forward without unembedding, >= 1.4x faster than
unfiltered run_with_cache; retained memory independent of the number of prompts.

Batches by length (``--batching MODEL_DIR``, e.g. the SmolLM2 folder of ../shared/REAL_MODELS.md): HarmBench's
159 standard behaviours through the model's tokenizer and chat template (as ``reversion-lens direction``
does; varied-length synthetic prompts when the HarmBench package is missing), ``residual_stats`` with the
old in-order batches against batches grouped by length, alternating each round, with the padded-token
fraction of each and the largest difference between the two results:

    python benchmarks/bench_stats.py --batching /work/models/smollm2 [--rounds 3] [--batch-size 16]
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, ratio_table, round_robin

import reversion_lens as rl


def build(small: bool):
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    if small:
        cfg = dict(d_model=128, d_head=32, n_layers=4, n_ctx=64, d_vocab=50257, act_fn="gelu_new", seed=0)
    else:
        cfg = dict(d_model=768, d_head=64, n_layers=12, n_ctx=64, d_vocab=50257, act_fn="gelu_new", seed=0)
    return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg))


class _Stop(Exception):
    pass


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if hasattr(obj, "cache_dict"):
        return nbytes(dict(obj.cache_dict))
    if isinstance(obj, rl.ResidStats):
        return sum(nbytes(t) for t in (obj.sum, obj.second, obj.per_prompt) if t is not None)
    return 0


def peak_rss_child(n_prompts: int, small: bool) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and streams n_prompts through it.

    n_prompts=0 runs a single one-prompt forward: the floor (weights plus one forward's activations)."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from bench_stats import build
import reversion_lens as rl
m = build({small}); m.eval()
g = torch.Generator().manual_seed(0)
p = rl.ProbeSet.from_tokens(torch.randint(0, 50257, (max(1, {n_prompts}), 64), generator=g))
rl.residual_stats(m, p, batch_size=32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


class InOrderProbes(rl.ProbeSet):
    """The old batching, the baseline: consecutive prompts in probe-set order."""

    def batches(self, batch_size: int = 32, *, by_length: bool = False):
        return super().batches(batch_size, by_length=False)

    @classmethod
    def of(cls, p: rl.ProbeSet) -> "InOrderProbes":
        return cls(p.tokens, p.attention_mask, p.read, p.span, p.name, p.texts)


def batching_prompts(model) -> tuple[list[str], str]:
    """HarmBench's standard test behaviours, or varied-length synthetic prompts when the package is missing."""
    from reversion_lens.errors import ConfigError
    from reversion_lens.hf.config import Source
    from reversion_lens.hf.data import read_prompts_from

    try:
        return read_prompts_from(Source.parse("harmbench:test", "probes")), "HarmBench test, standard behaviours"
    except ConfigError as e:
        print(f"HarmBench is not installed ({e}); using synthetic prompts of 3 to 60 words instead.")
        g = torch.Generator().manual_seed(0)
        words = "please explain how the a to of water works when you write list steps for my friend".split()
        lengths = torch.randint(3, 61, (159,), generator=g).tolist()
        return [" ".join(words[i % len(words)] for i in range(k)) for k in lengths], "synthetic, 3-60 words"


def batching(args: argparse.Namespace) -> None:
    """residual_stats with in-order batches vs batches grouped by length, on a real model and real prompts."""
    from reversion_lens.models import load_hf
    from reversion_lens.text import text_probes

    model = load_hf(str(args.batching), device="cpu")
    model.eval()
    prompts, what = batching_prompts(model)
    grouped = text_probes(model, prompts, chat="auto")
    in_order = InOrderProbes.of(grouped)
    lengths = grouped.lengths
    bs = args.batch_size
    variants = {"in order (old)": in_order, "grouped by length": grouped}
    results = {}

    def timed(name: str) -> float:
        t0 = time.process_time()
        results[name] = rl.residual_stats(model, variants[name], batch_size=bs, keep_per_prompt=True)
        return time.process_time() - t0

    names = list(variants)
    for name in names:  # warm-up
        timed(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):  # paired rounds, the order alternating
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(name))
    base = "in order (old)"
    print(f"\n{args.batching}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; {len(prompts)} prompts ({what}),"
          f" {int(lengths.min())}-{int(lengths.max())} tokens (median {int(lengths.median())}), batch {bs}, "
          f"1 thread, {args.rounds} rounds")  # fmt: skip
    print(f"{'batching':<20} {'CPU s (median)':>14} {'ratio to in order, median [min-max]':>36} {'padded tokens':>14}")
    for name in names:
        ratios = sorted(t / b for t, b in zip(times[name], times[base]))
        frac = variants[name].padded_fraction(bs, by_length=name != base)
        print(f"{name:<20} {statistics.median(times[name]):>14.2f} {statistics.median(ratios):>18.3f} "
              f"[{ratios[0]:.3f}-{ratios[-1]:.3f}] {100 * frac:>13.1f}%")  # fmt: skip
    a, b = results[base], results["grouped by length"]
    dm = float((a.mean - b.mean).abs().max())
    dp = float((a.per_prompt - b.per_prompt).abs().max())
    scale = float(a.per_prompt.abs().max())
    print(
        f"max |difference| grouped vs in order: means {dm:.3g}, per-prompt vectors {dp:.3g} (largest |value| {scale:.4g})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="4 layers, d_model 128 (quick check)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--batching", type=Path, metavar="MODEL_DIR", help="only the batches-by-length comparison")
    ap.add_argument("--batch-size", type=int, default=16, help="probe batch size for --batching (default 16)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.batching is not None:
        batching(args)
        return
    model = build(args.small)
    model.eval()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.cfg.d_vocab, (args.prompts, 64), generator=g)
    probes = rl.ProbeSet.from_tokens(toks)
    kept: dict[str, int] = {}

    def body_forward():
        def stop(x, hook):
            raise _Stop

        with torch.inference_mode(), model.hooks(fwd_hooks=[("ln_final.hook_in", stop)]):
            try:
                model(toks)
            except _Stop:
                pass

    def full_forward():
        with torch.inference_mode():
            out = model(toks)
        kept["full forward (logits)"] = nbytes(out)

    def ours():
        out = rl.residual_stats(model, probes, batch_size=args.prompts)
        kept["reversion_lens.residual_stats (all layers)"] = nbytes(out)

    def cache_all():
        with torch.inference_mode():
            out = model.run_with_cache(toks)
        kept["run_with_cache, no filter"] = nbytes(out)
        del out
        gc.collect()

    def cache_resid():
        with torch.inference_mode():
            out = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_out") and n.count(".") == 2)
        kept["run_with_cache, resid_post filter"] = nbytes(out)
        del out
        gc.collect()

    variants = {
        "body forward, no unembedding (the limit)": body_forward,
        "reversion_lens.residual_stats (all layers)": ours,
        "full forward (logits)": full_forward,
        "run_with_cache, no filter": cache_all,
        "run_with_cache, resid_post filter": cache_resid,
    }
    times = round_robin(variants, args.rounds)
    rows = ratio_table(times, "body forward, no unembedding (the limit)")
    size = "tiny 4x128" if args.small else "gpt2-small-sized 12x768"
    extra = {k: f"{v / 2**20:8.2f} MiB" for k, v in kept.items()}
    print_table(rows, f"{size}, vocab 50257, {args.prompts} prompts x 64 tokens, 1 thread, {args.rounds} rounds", extra)
    ours_t, cache_t = times["reversion_lens.residual_stats (all layers)"], times["run_with_cache, no filter"]
    speedup = sorted(c / o for c, o in zip(cache_t, ours_t))
    print(
        f"\nunfiltered run_with_cache / ours: median {speedup[len(speedup) // 2]:.2f}x [{speedup[0]:.2f}-{speedup[-1]:.2f}]"
    )
    rss = {n: peak_rss_child(n, args.small) for n in (1, args.prompts, 4 * args.prompts, 16 * args.prompts)}
    for n, mib in rss.items():
        print(f"peak RSS of a fresh process streaming {n:4d} prompts (batch 32): {mib:7.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "kept": kept, "rss": rss}, indent=2))


if __name__ == "__main__":
    main()
