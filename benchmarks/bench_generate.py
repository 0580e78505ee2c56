"""Greedy generation throughput: reversion_lens' KV-cache decoder against transformers' ``generate``.

The same weights twice: a ``TransformerBridge`` (what the toolkit decodes) and a plain transformers model
(the baseline), SmolLM2-135M-Instruct at /work/models/smollm2 by default. Chat-templated, templated benign
prompts of different lengths, left-padded; 64 new tokens per row with no stop token (both decoders
produce every token); batch 1 and 16; one torch thread, process CPU time, variants round-robin in one
process, ratios taken within a round, median [min-max] (PERFORMANCE.md). Before timing, the tokens of
each decoder are checked equal to transformers' on the timed batch.

    python benchmarks/bench_generate.py [--model DIR] [--tiny] [--rounds 3] [--new-tokens 64]

``--tiny``: a random-weight Llama with grouped-query attention (tests/hf_fixtures.py, 4 layers, d_model
128), for a quick check. Goal: the cached decoder >= 0.9x transformers' throughput.

Variants: transformers' ``generate`` (baseline); ``greedy_generate`` with its default (the KV cache through a
transformers twin of the bridge, calling the bridge's resid_pre/resid_post hook points); the same with a
no-op hook inside a block (``blocks.0.mlp.hook_out``), which sends the cached decoder through the bridge's own
components; and, at batch 1, the no-cache decoder that was the only one before.

Measured 2026-12-02 on this machine (2 shared cores, load average 6-14 from other jobs, so CPU times moved
by up to 25% between runs), torch 2.13 CPU, transformers 5.24, TL 4.3, ``--rounds 3``; throughput against
transformers, median [min-max] of per-round ratios; every decoder's tokens equal transformers' on the batch:

    SmolLM2, 64 new tokens   run 1, batch 1       run 1, batch 16      run 2, batch 1       run 2, batch 16
    transformers generate    5.80 s = 11.0 tok/s  13.72 s = 74.6 tok/s 5.69 s = 11.3 tok/s  14.00 s = 73.1 tok/s
    KV cache (default)       0.977 [0.768-1.126]  0.901 [0.877-1.109]  1.204 [1.092-1.249]  1.066 [1.042-1.098]
    KV cache, bridge         0.637 [0.631-0.833]  0.681 [0.659-0.799]  0.815 [0.769-0.851]  0.704 [0.624-0.705]
    no cache (before)        0.250 [0.227-0.282]  -                    0.276 [0.237-0.277]  -
    (the no-cache decoder: 20.9-23.2 s for 64 tokens at batch 1, 0.33-0.36 s per token)

    --tiny (4 layers, d_model 128: Python overhead dominates)   batch 1               batch 16
    KV cache (default)                                          0.894 [0.894-0.944]   0.911 [0.894-1.170]
    KV cache through the bridge                                 0.395 [0.361-0.419]   0.494 [0.379-0.520]
    no cache (before)                                           0.314 [0.269-0.346]   -
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]  # this checkout's package first
from _timing import round_robin

from reversion_lens import generation
from reversion_lens.generation import cache_support, greedy_generate
from reversion_lens.probes import pad_sequences

TASKS = [
    "Convert {a} kilometres to miles.",
    "What is {a} plus {b}?",
    "Sort these numbers from smallest to largest: {a}, {b}, {c}, {d}.",
    "Write the word {w} backwards.",
    "How many minutes are there in {a} hours?",
    "Give me a short tip for keeping a {w} clean.",
    "Explain in one sentence why the number {a} is even or odd.",
    "List three fruits that are {w} coloured and say which one you like best, with a reason.",
]
WORDS = ["kitchen", "garden", "bicycle", "window", "yellow", "red", "green", "desk"]


def _noop(x, hook):
    return None


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    """``n`` chat-templated benign requests (templated, not copied from anywhere), token ids."""
    out = []
    for i in range(n):
        text = TASKS[i % len(TASKS)].format(a=3 + 7 * i, b=11 + i, c=5 * i, d=42 - i, w=WORDS[i % len(WORDS)])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def load(args):
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model
    if args.tiny:
        from hf_fixtures import save_tiny_llama

        folder = save_tiny_llama(Path(tempfile.mkdtemp()) / "llama", n_layers=4, d_model=128, seed=0, n_positions=256)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if args.tiny:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(8, 40, (16,), generator=g)
        prompts = [torch.randint(7, len(tok), (int(k),), generator=g).tolist() for k in lengths]
    else:
        prompts = prompts_for(tok, 16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return bridge, hf, prompts, pad, str(folder)


def variants_for(bridge, hf, toks, mask, n_new: int, pad: int, old: bool) -> dict:
    """The timed calls on one left-padded batch: each returns the new tokens of every row."""

    def hf_generate():
        with torch.inference_mode():
            out = hf.generate(toks, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=pad, eos_token_id=None)  # fmt: skip
        return out[:, toks.shape[1] :].tolist()

    def ours(cache, plan, hooks=()):
        def run():
            with bridge.hooks(fwd_hooks=list(hooks)):
                assert generation._plan(bridge, cache) == plan  # the decoder being timed
                return greedy_generate(bridge, toks, mask, n_new, pad_id=pad, batch_size=len(toks), cache=cache)

        return run

    variants = {
        "transformers generate": hf_generate,
        "greedy_generate (KV cache)": ours(None, "transformers"),
        "  same, hook inside a block (bridge)": ours(None, "bridge", [("blocks.0.mlp.hook_out", _noop)]),
    }
    if old:
        variants["greedy_generate (no cache, before)"] = ours(False, "none")
    return variants


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/models/smollm2", help="a Hugging Face folder (default: SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer Llama instead (quick check)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--no-old", action="store_true", help="skip the no-cache decoder (batch 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    bridge, hf, all_prompts, pad, folder = load(args)
    n_new = args.new_tokens
    print(f"model {folder}: {bridge.cfg.n_layers} layers, d_model {bridge.cfg.d_model}, vocabulary "
          f"{bridge.cfg.d_vocab}; cache: {cache_support(bridge)}; {n_new} new tokens per row")  # fmt: skip

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = all_prompts[:bs]
        toks, mask = pad_sequences(prompts, pad, padding_side="left")
        variants = variants_for(bridge, hf, toks, mask, n_new, pad, old=bs == 1 and not args.no_old)
        hf_generate = variants["transformers generate"]
        expected = hf_generate()
        assert all(len(r) == n_new for r in expected)
        same = {name: fn() == expected for name, fn in variants.items() if name != "transformers generate"}
        times = round_robin(variants, rounds=args.rounds, warmup=0)  # the correctness pass above is the warm-up
        base = times["transformers generate"]
        lengths = [len(q) for q in prompts]
        print(f"\nbatch {bs} (prompt lengths {min(lengths)}-{max(lengths)}), {args.rounds} rounds, CPU s")
        print(f"{'variant':<38} {'CPU s (median)':>14} {'tokens/s':>9} {'throughput vs transformers':>28}  same tokens")
        for name, ts in times.items():
            ratios = [b / t for t, b in zip(ts, base)]  # throughput ratio = time ratio inverted
            med = statistics.median(ts)
            print(f"{name:<38} {med:>14.2f} {bs * n_new / med:>9.1f} {statistics.median(ratios):>12.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]  {same.get(name, 'baseline')}")  # fmt: skip
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
