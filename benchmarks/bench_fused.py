"""What the toy world's two speed paths buy: the fused training forward and 16-column padding.

The default toy model (d_model 64, 3 layers, vocabulary 26), one torch thread, process CPU time, all
variants round-robin in one process, ratios taken within a round (PERFORMANCE.md):

    python benchmarks/bench_fused.py [--rounds 5] [--steps 20]

* ``--steps`` pretraining AdamW steps (batch 128; the longest conversation is 15 tokens) through the
  bridge at the natural width 15 (the old path, the baseline), through the bridge padded to 16 columns,
  and through :func:`reversion_lens.toyworld.fused.fused_lm_loss` padded to 16 (the history's path);

Padding was also tried in evaluation (not kept): greedy generation with prompts of ~10 tokens padded to
16 cost 1.13x [0.90-1.19] (the extra columns cost the matmuls more than the softmax saves), and the
teacher-forced loss batches padded from 15 to 16 gained nothing measurable (1.03x [0.98-1.12]).

Each training variant starts from the same weights and optimizer state every round.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import print_table, ratio_table, round_robin

from reversion_lens.toyworld import ToyConfig, ToyData
from reversion_lens.toyworld.fused import fused_lm_loss
from reversion_lens.training import OptimConfig, lm_loss, make_optimizer, train_step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from transformer_lens import TransformerBridge

    config = ToyConfig.preset("default")
    model = TransformerBridge.boot_native(config.model_config(0))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lang = config.language()
    batches = {w: [ToyData(lang, "pretrain", config.pretrain_batch, 0, width=w).batch(s) for s in range(args.steps)]
               for w in (0, 16)}  # fmt: skip
    assert batches[0][0].tokens.shape[1] == 15 and batches[16][0].tokens.shape[1] == 16

    def training(width: int, loss_fn):
        def run() -> None:
            model.load_state_dict(start)
            opt = make_optimizer(model, OptimConfig(lr=1e-3))
            for b in batches[width]:
                train_step(model, opt, b, loss_fn=loss_fn, grad_clip=1.0)

        return run

    train = {
        "bridge, width 15 (the old path)": training(0, lm_loss),
        "bridge, padded to 16": training(16, lm_loss),
        "fused forward, padded to 16 (the history's path)": training(16, fused_lm_loss),
    }
    times = round_robin(train, args.rounds)
    head = f"default toy model, 1 thread, {args.rounds} rounds"
    print_table(ratio_table(times, next(iter(train))), f"{args.steps} pretraining steps, batch 128: {head}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
