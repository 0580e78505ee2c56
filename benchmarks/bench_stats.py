"""Residual statistics against the forward-pass limit and against run_with_cache.

GPT-2-small-sized random model (12 layers, d_model 768, vocabulary 50257), 32 prompts x 64 tokens,
one torch thread, process CPU time, variants round-robin, ratios within a round (see _timing.py):

    python benchmarks/bench_stats.py [--rounds 5] [--prompts 32] [--small]

Goals (issue 2): our statistics <= 1.05x the body forward without unembedding, >= 1.4x faster than
unfiltered run_with_cache; retained memory independent of the number of prompts.
"""

import argparse
import gc
import json
import subprocess
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="4 layers, d_model 128 (quick check)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
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
