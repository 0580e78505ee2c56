"""The cost of blocking and of tracking, against the plain training step and the probe forward.

GPT-2-small-sized random model (12 layers, d_model 768, vocabulary 50257; ``--small``: 4 layers,
d_model 128), a batch of 32 x 64 tokens, one torch thread, process CPU time, all variants round-robin in
one process (the order rotates each round), ratios taken within a round (PERFORMANCE.md):

    python benchmarks/bench_block.py [--rounds 3] [--small]

* one AdamW step (``reversion_lens.training.train_step``: forward, loss, backward, clipping, step,
  ``after_step``): plain, with ``grad`` on all layers, with ``clamp`` on all layers, with ``update`` on
  all layers. Interventions are attached before and removed after the timed step (not timed).
* one ``DriftTracker`` call against the forward it needs: the probe set through the model in
  inference mode, stopped after the last tracked layer (no unembedding).

Goals: each block mode <= 1.05x the plain step; tracking <= 1.05x the probe forward.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import cpu_time, print_table, ratio_table

import reversion_lens as rl
from reversion_lens.directions import random_direction
from reversion_lens.interventions import block
from reversion_lens.tracking import DriftTracker
from reversion_lens.training import Batch, OptimConfig, make_optimizer, train_step


def build(small: bool, pos: int):
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    if small:
        cfg = dict(d_model=128, d_head=32, n_layers=4, n_ctx=pos, d_vocab=50257, act_fn="gelu_new", seed=0)
    else:
        cfg = dict(d_model=768, d_head=64, n_layers=12, n_ctx=pos, d_vocab=50257, act_fn="gelu_new", seed=0)
    return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg))


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pos", type=int, default=64)
    p.add_argument("--small", action="store_true", help="4 layers, d_model 128 (a quick run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    model = build(args.small, args.pos)
    L, D, V = model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, V, (args.batch, args.pos), generator=g)
    batch = Batch(toks, torch.ones_like(toks), torch.ones_like(toks))
    probes = rl.ProbeSet.from_tokens(torch.randint(0, V, (args.batch, args.pos), generator=g))
    v = random_direction(D, range(L), seed=1)
    ref = rl.residual_stats(model, probes)
    base = ref.mean + 3.0 * v.vectors.double()  # a stand-in base model, 3 units along v

    frozen = build(args.small, args.pos)  # the per-input clamp's reference: a second, frozen copy
    frozen.load_state_dict(model.state_dict())
    optim = OptimConfig(lr=1e-5)
    opt = make_optimizer(model, optim)
    model.train()

    def step_with(mode: str | None):
        def run() -> float:
            opts = {"clamp": {"reference": ref}, "clamp-per-input": {"reference_model": frozen}}.get(mode, {})
            iv = None if mode is None else block(model, v, mode.split("-")[0], **opts)
            if iv is not None:
                iv.attach()
            try:
                return cpu_time(
                    lambda: train_step(model, opt, batch, interventions=[iv] if iv else [], grad_clip=optim.grad_clip)
                )
            finally:
                if iv is not None:
                    iv.remove()

        return run

    last = f"blocks.{L - 1}.hook_resid_post"

    def stop(x, hook):
        raise _Stop

    @torch.inference_mode()
    def probe_forward() -> None:
        with model.hooks(fwd_hooks=[(last, stop)]):
            for b in probes.batches(32):
                try:
                    model(b.tokens, attention_mask=b.attention_mask)
                except _Stop:
                    pass

    tracker = DriftTracker(probes, v, ref, base)
    steps = {"plain step": step_with(None), "grad (all layers)": step_with("grad"),
             "clamp to the mean (all layers)": step_with("clamp"),
             "clamp per input (all layers; + a reference forward)": step_with("clamp-per-input"),
             "update (all layers)": step_with("update")}  # fmt: skip
    track = {"probe forward (stops after the last layer)": lambda: cpu_time(probe_forward),
             "DriftTracker call": lambda: cpu_time(lambda: tracker(1, model))}  # fmt: skip
    variants = {**steps, **track}
    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(variants[name]())
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s wall)", flush=True)

    size = "small (4 layers, d_model 128)" if args.small else "GPT-2-small size (12 layers, d_model 768)"
    head = f"{size}, vocab {V}, batch {args.batch} x {args.pos} tokens, 1 thread, {args.rounds} rounds"
    print_table(ratio_table({k: times[k] for k in steps}, "plain step"), f"AdamW training step: {head}")
    print_table(ratio_table({k: times[k] for k in track}, "probe forward (stops after the last layer)"),
                f"Tracking vs the probe forward it needs: {head}")  # fmt: skip
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
