"""Peak memory of ``reversion-lens direction`` and ``track`` against what they must hold.

Every measurement is a fresh process (peak RSS: ``VmHWM`` of /proc/self/status), all in one run:

* floors: ``imports`` (an empty process with every import the commands make), ``weights`` (the same
  plus the checkpoint's tensors, read with safetensors), ``train step`` (the same plus AdamW and a few
  plain Hugging Face training steps on the batches ``track`` uses: weights + gradients + optimizer state
  + one batch's activations);
* ``direction``: ``reversion-lens direction --base B --aligned A --prompts PROMPTS`` (both checkpoints'
  statistics, v_rev, nulls, readout, evaluations), the CLI in the child process;
* ``track``: ``reversion-lens track`` on that direction, ``--steps`` fine-tuning steps of batch 8,
  tracked at every step, the resumable state written at every step (``--checkpoint-every 1``).

Models: ``gpt2s``, a random GPT-2-small-sized Hugging Face GPT-2 (12 layers, d_model 768, vocabulary
50257, tied) and its perturbed copy; ``smollm2``, SmolLM2-135M-Instruct (30 layers, d_model 576; a
folder built by ../shared/tools/smollm2_folder.py) and its perturbed copy. Probe prompts: HarmBench's
159 standard test behaviours, written one per line under ``--work`` (synthetic prompts when the package is
missing); fine-tuning data: templated arithmetic pairs.

    python benchmarks/bench_memory.py [--models gpt2s,smollm2] [--smollm2 /work/models/smollm2]
        [--steps 3] [--trace]

Prints, per model, each process's peak RSS and the ratios the issue sets: direction / (imports +
weights) <= 1.5 and track / (train step floor) <= 1.3. ``--trace`` also prints, per stage of each
command (loads, statistics, nulls, saves, steps), the RSS on entry and exit and the exact peak inside
(``VmHWM``, reset through /proc/self/clear_refs at every stage boundary), which is how the excess was found.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The imports `direction` and `track` make before any model loads (the floor's imports).
IMPORTS = """
import torch, transformers, safetensors.torch
from transformer_lens import TransformerBridge
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import reversion_lens, reversion_lens.cli, reversion_lens.pipeline.runner, reversion_lens.hf.setting
import reversion_lens.text, reversion_lens.training, reversion_lens.tracking, reversion_lens.nulls
"""

PRELUDE = """
import json, os, sys, time
_seen = [0.0]  # with --trace: the peak before the last VmHWM reset
sys.path.insert(0, {root!r})

def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

def rss():
    return _status("VmRSS")

def peak():
    return _status("VmHWM")
"""

# --trace: wrap the stages; at every entry and exit the peak since the last event (VmHWM, then reset by
# writing 5 to /proc/self/clear_refs) is charged to every open stage: exact peaks, no sampling.
TRACE = """
_stack, _rows = [], []

def _charge():
    h = peak()
    for frame in _stack:
        frame[2] = max(frame[2], h)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def _wrap(owner, attr, label):
    fn = getattr(owner, attr)
    def wrapped(*a, **k):
        _charge()
        frame = [label, rss(), rss()]
        _stack.append(frame)
        try:
            return fn(*a, **k)
        finally:
            _charge()
            _stack.remove(frame)
            _rows.append((len(_stack), label, frame[1], rss(), frame[2]))
    setattr(owner, attr, wrapped)
    for m in list(sys.modules.values()):  # names imported elsewhere (from .x import f) too
        if getattr(m, "__name__", "").startswith("reversion_lens") and m is not owner:
            for k, v in list(vars(m).items()):
                if v is fn:
                    setattr(m, k, wrapped)

import transformer_lens, transformers, reversion_lens.models as M, reversion_lens.history as H
import reversion_lens.io as IO, reversion_lens.training as T, reversion_lens.activations as A
import reversion_lens.pipeline.runner as R, reversion_lens.hf.setting as S, reversion_lens.text as TX
import reversion_lens.directions as D, reversion_lens.nulls as N
_wrap(transformer_lens.TransformerBridge, "boot_transformers", "TransformerBridge.boot_transformers")
_wrap(transformers.AutoModelForCausalLM, "from_pretrained", "  AutoModelForCausalLM.from_pretrained")
for mod, names in ((M, ["load_hf", "load_native"]), (IO, ["save_tensors", "load_tensors"]),
                   (R, ["prepare_seed", "run_arm", "_history_stats", "_evaluate_history", "_finish"]),
                   (H.History, ["stats"]), (A, ["residual_stats"]), (T, ["finetune", "train_step"]),
                   (T._Checkpoints, ["save", "load"]), (S.HFHistory, ["load", "probes", "finetune_data"]),
                   (D, ["vocab_readout"]), (N, ["null_quantiles"])):
    for name in names:
        _wrap(mod, name, f"{getattr(mod, '__name__', mod)}.{name}".replace("reversion_lens.", ""))

_top = ["(whole command)", rss(), rss()]
_stack.append(_top)

def report_trace():
    _charge()
    _rows.append((0, _top[0], _top[1], rss(), _top[2]))
    _seen[0] = _top[2]
    print("TRACE stage RSS MiB: in -> out, max inside", file=sys.stderr)
    for depth, label, a, b, m in _rows:
        print(f"TRACE {'  ' * depth}{label:<48} {a:8.0f} -> {b:8.0f}  max {m:8.0f}", file=sys.stderr)
"""

EPILOGUE = """
print("PEAK_MIB", json.dumps({"peak": max(peak(), _seen[0]), "rss": rss()}))
"""


def child(body: str, trace: bool = False) -> dict[str, float]:
    """Run ``body`` in a fresh process after the imports; return its peak RSS (MiB)."""
    code = PRELUDE.format(root=str(ROOT)) + IMPORTS + "torch.set_num_threads(1)\n"
    if trace:
        code += TRACE
    code += textwrap.dedent(body) + ("\nreport_trace()\n" if trace else "") + EPILOGUE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-6000:]}")
    if trace:
        for line in out.stderr.splitlines():
            if line.startswith("TRACE"):
                print("   ", line[6:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAK_MIB"))
    return json.loads(line.split(" ", 1)[1])


# ---------------------------------------------------------------------- fixtures
def prepare(work: Path, models: list[str], smollm2: Path) -> dict[str, dict[str, Path]]:
    """Model folders (base, aligned), the fine-tuning data and the prompt source, built once under ``work``."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_fixtures import make_tokenizer, perturbed_copy

    out: dict[str, dict[str, Path]] = {}
    for name in models:
        folder = work / name
        base = folder / "base"
        if name == "gpt2s" and not (base / "config.json").exists():
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            cfg = GPT2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # 12 x 768, vocabulary 50257
            base.mkdir(parents=True, exist_ok=True)
            GPT2LMHeadModel(cfg).eval().save_pretrained(base)
            tok = make_tokenizer()
            tok.save_pretrained(base)
            cfg_path = base / "tokenizer_config.json"
            tc = json.loads(cfg_path.read_text())
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(tc, indent=2))
        if name == "smollm2":
            if not (smollm2 / "config.json").exists():
                raise SystemExit(f"{smollm2} holds no model: python ../shared/tools/smollm2_folder.py {smollm2}")
            base = smollm2
        aligned = folder / "aligned"
        if not (aligned / "config.json").exists():
            perturbed_copy(base, aligned, scale=0.02, seed=1)
        out[name] = {"base": base, "aligned": aligned}
    data = work / "finetune.jsonl"
    if not data.exists():
        rows = []
        for i in range(64):
            a, b = 3 + 7 * i % 50, 2 + 5 * i % 30
            rows.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def probe_prompts() -> list[str]:
    """HarmBench's 159 standard test behaviours; synthetic prompts of 3-50 words when the package is missing."""
    sys.path.insert(0, str(ROOT))
    from reversion_lens.errors import ConfigError
    from reversion_lens.hf.config import Source
    from reversion_lens.hf.data import read_prompts_from

    try:
        return read_prompts_from(Source.parse("harmbench:test", "probes"))
    except ConfigError as e:
        print(f"HarmBench is not installed ({e}): synthetic prompts instead.")
        return [f"please explain {' '.join(['how'] * (3 + i % 48))}" for i in range(159)]


# ---------------------------------------------------------------------- measurements
def measure(
    name: str, dirs: dict[str, Path], work: Path, steps: int, prompts: list[str], trace: bool
) -> dict[str, float]:
    base, aligned = dirs["base"], dirs["aligned"]
    weights = aligned / "model.safetensors"
    res: dict[str, float] = {}
    res["imports"] = child("")["peak"]
    res["weights"] = child(f"w = safetensors.torch.load_file({str(weights)!r}); [t.sum() for t in w.values()]")["peak"]
    res["weight_bytes_mib"] = weights.stat().st_size / 2**20
    out_dir = work / f"{name}-direction"
    shutil.rmtree(out_dir, ignore_errors=True)
    # HarmBench's standard behaviours as a text file under --work (the CLI's --prompt-field and --where would
    # apply to the fine-tuning data too), or synthetic prompts of varied length when the package is missing.
    pfile = work / "prompts.txt"
    pfile.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
    argv = ["direction", "--base", str(base), "--aligned", str(aligned), "--out", str(out_dir), "--device", "cpu",
            "--prompts", str(pfile)]  # fmt: skip
    print(f"  {name}: direction ...", flush=True)
    res["direction"] = child(f"assert reversion_lens.cli.main({argv!r}) == 0", trace)["peak"]
    data = work / "finetune.jsonl"
    # The plain training-step floor: the aligned weights once, AdamW, `steps` plain Hugging Face steps on
    # batches like track's (same examples, tokenizer, template, batch size and order).
    res["train step"] = child(
        f"""
        from reversion_lens.text import TextBatchSource, read_examples
        cfg = AutoConfig.from_pretrained({str(aligned)!r})
        hf = AutoModelForCausalLM.from_config(cfg)  # the weights, once; then read into place from the file
        own = {{**dict(hf.named_parameters()), **dict(hf.named_buffers())}}
        with open({str(weights)!r}, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            for key, info in header.items():
                if key in own:
                    f.seek(8 + n + info["data_offsets"][0])
                    f.readinto(memoryview(own[key].detach().numpy()).cast("B"))
        hf.train()
        tok = AutoTokenizer.from_pretrained({str(aligned)!r})
        class _Tok:  # what TextBatchSource needs of a model: the tokenizer, and to_tokens for plain text
            tokenizer = tok
            def to_tokens(self, s, **k):
                return torch.tensor([[tok.bos_token_id] * (tok.bos_token_id is not None) + tok(s)["input_ids"]])
        src = TextBatchSource(_Tok(), read_examples({str(data)!r}), batch_size=8, seed=0)
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
        for step in range({steps}):
            b = src.batch(step)
            labels = b.tokens.masked_fill(b.loss_mask == 0, -100)
            loss = hf(input_ids=b.tokens, attention_mask=b.attention_mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        """
    )["peak"]
    track_out = work / f"{name}-track"
    shutil.rmtree(track_out, ignore_errors=True)
    argv = ["track", "--model", str(aligned), "--data", str(data), "--direction", str(out_dir), "--steps", str(steps),
            "--track-every", "1", "--out", str(track_out), "--device", "cpu", "--checkpoint-every", "1",
            "--prompts", str(pfile)]  # fmt: skip
    print(f"  {name}: track ...", flush=True)
    res["track"] = child(f"assert reversion_lens.cli.main({argv!r}) == 0", trace)["peak"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2s,smollm2", help="comma list of gpt2s, smollm2")
    ap.add_argument("--smollm2", type=Path, default=Path("/work/models/smollm2"), help="the SmolLM2 HF folder")
    ap.add_argument("--steps", type=int, default=3, help="fine-tuning steps of track (default 3)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_memory", help="model copies and outputs")
    ap.add_argument("--trace", action="store_true", help="print RSS per stage of direction and track")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dirs = prepare(args.work, models, args.smollm2)
    prompts = probe_prompts()
    results = {}
    for name in models:
        r = measure(name, dirs[name], args.work, args.steps, prompts, args.trace)
        results[name] = r
        print(f"\n{name}: peak RSS of fresh processes (MiB); weights file {r['weight_bytes_mib']:.0f} MiB")
        for key in ("imports", "weights", "direction", "train step", "track"):
            print(f"  {key:<12} {r[key]:8.0f}")
        d, t = r["direction"] / r["weights"], r["track"] / r["train step"]
        print(f"  direction / (imports + weights)     = {d:.2f}  (goal <= 1.5)")
        print(f"  track / (train step floor)          = {t:.2f}  (goal <= 1.3)")
        r["direction_ratio"], r["track_ratio"] = d, t
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
