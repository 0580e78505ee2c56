"""Peak memory of LoRA fine-tuning against full fine-tuning of the same TransformerBridge (AdamW, a few steps).

Each variant runs in a fresh Python process (one torch thread) and reports ``resource.getrusage`` peak RSS
(``ru_maxrss``) twice: after loading the model (the floor every variant shares) and after the training steps.
Variants: ``load`` (load, one no-grad forward: the floor), ``full`` (AdamW on every parameter), ``lora`` (rank
``--r`` adapters on ``--targets`` through :func:`reversion_lens.lora.apply_lora`, AdamW on the adapters only).
Variants run round-robin ``--repeats`` times; figures are median [min-max]. The weights' own size is printed as
the reference.

    python benchmarks/bench_lora_memory.py                        # SmolLM2-135M at /work/models/smollm2
    python benchmarks/bench_lora_memory.py --model PATH_OR_SPEC   # any spec (HF folder, gguf:FILE, ...)
    python benchmarks/bench_lora_memory.py --tiny                 # a random 4-layer Llama, seconds
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "/work/models/smollm2"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from reversion_lens.specs import parse_spec
from reversion_lens import lora

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

variant, spec, steps, batch, seq, r, targets = {args!r}
model = parse_spec(spec).load()
weights = sum(p.numel() * p.element_size() for p in {{id(p): p for p in model.parameters()}}.values())
g = torch.Generator().manual_seed(0)
toks = torch.randint(0, int(model.cfg.d_vocab), (batch, seq), generator=g)
with torch.no_grad():
    model(toks[:1])
loaded = peak_mib()
trainable, losses, t0 = 0, [], time.perf_counter()
if variant != "load":
    if variant == "lora":
        lora.apply_lora(model, r=r, alpha=2 * r, target_modules=targets, seed=0)
        params = lora.lora_parameters(model)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(toks, return_type="loss")
        loss.backward()
        opt.step()
        losses.append(loss.item())
print(json.dumps({{"loaded_mib": loaded, "peak_mib": peak_mib(), "weights_mib": weights / 2**20,
                  "trainable": trainable, "losses": losses, "train_s": time.perf_counter() - t0}}))
"""


def run_child(variant: str, args: argparse.Namespace, spec: str) -> dict:
    targets = None if args.targets == "all-linear" else args.targets.split(",")
    code = CHILD.format(root=str(ROOT), args=(variant, spec, args.steps, args.batch, args.seq, args.r, targets))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_model(folder: Path) -> str:
    """A random SmolLM2-shaped Llama, small: 4 layers, d_model 128, GQA 4/2, vocabulary 49152, tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_fixtures import make_tokenizer

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)  # a 61-word tokenizer: the benchmark feeds token ids only
    return str(folder)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a model spec (default: the SmolLM2 folder)")
    ap.add_argument("--tiny", action="store_true", help="a random 4-layer Llama instead (quick check)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="all-linear", help="comma-separated LoRA targets, or all-linear")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            spec = tiny_model(Path(tmp) / "tiny")
        else:
            spec = args.model
            if spec == DEFAULT_MODEL and not (Path(spec) / "config.json").exists():
                raise SystemExit(f"{spec} is not built yet (python /work/shared/tools/smollm2_folder.py {spec}).")
        variants = ("load", "full", "lora")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                runs[v].append(run_child(v, args, spec))
    weights = runs["load"][0]["weights_mib"]
    full_peak = statistics.median(r["peak_mib"] for r in runs["full"])
    print(
        f"\nmodel {'tiny random Llama' if args.tiny else spec}: weights {weights:.1f} MiB (float32); AdamW, "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens; LoRA r={args.r} on {args.targets}; "
        f"{args.repeats} run(s) each, median [min-max]"
    )
    print(
        f"{'variant':<8} {'trainable':>12} {'peak after load MiB':>26} {'peak MiB':>26} "
        f"{'peak - load MiB':>20} {'/ weights':>10} {'/ full':>7}"
    )
    for v in variants:
        rs = runs[v]
        peaks = [r["peak_mib"] for r in rs]
        extra = [r["peak_mib"] - r["loaded_mib"] for r in rs]
        print(
            f"{v:<8} {rs[0]['trainable']:>12,} {fmt([r['loaded_mib'] for r in rs]):>26} {fmt(peaks):>26} "
            f"{statistics.median(extra):>20.1f} {statistics.median(extra) / weights:>10.2f} "
            f"{statistics.median(peaks) / full_peak:>7.3f}"
        )
    for v in ("full", "lora"):
        print(
            f"{v} losses (first run): {[round(x, 3) for x in runs[v][0]['losses']]}, "
            f"train wall {runs[v][0]['train_s']:.1f} s"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
