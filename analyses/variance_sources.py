"""Where does the toy demo's per-seed spread come from? One source of randomness varied at a time.

    python analyses/variance_sources.py                 # default preset, the whole study (~45 min CPU)
    python analyses/variance_sources.py --quick --out results/variance_quick   # tiny preset smoke run

Each *run* is one fine-tuning of an aligned toy model in one arm (``none``: no block; ``grad``: the
``grad`` block of v_rev at every layer; ``control``: aligned-mix data, no block), identified by the
seeds of its phases and its float path. Sources, each varied with the others held at seed 0:

- ``seed``: the demo's design, every phase seeded by the seed (seeds 0-4 are the demo's seeds);
- ``pretrain``: ``ToyConfig.pretrain_seed`` (initial weights and pretraining data order);
- ``align``: ``ToyConfig.align_seed`` (alignment data order);
- ``finetune``: the fine-tuning data order (``ToyHistory.finetune_data(seed=...)``);
- ``align@base4`` / ``finetune@base4``: the same two on pretrained base 4 (base 0 reverts little);
- ``eval``: the 512 held-out harmful prompts: every run is also scored on the evaluation sets that
  history seeds 0-7 would draw (the draws share prompts: only ~375 harmful prompts of 3 digits lie in
  the evaluation region, and each draw takes ~170 of them), beside the binomial standard error;
- ``isa-ft`` / ``isa-align`` / ``isa-all``: the ``seed`` runs again on another float path, the stand-in
  for another CPU: torch's, MKL's and oneDNN's kernels limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
  ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, set in the worker processes), in
  fine-tuning only; in alignment and fine-tuning (the default path's pretrained model: what shipping
  pretrained bases would leave to chance); or in every phase. Histories not made on the default path
  are built in ``--out``/``cache-<path>`` (cache keys ignore the float path). Bitwise equality is
  checked on the final weights. (Two torch threads per worker change the reduction order too, but cost
  ~16x the CPU time of one on this shared 2-core machine: 88 s instead of 5.4 s for one fine-tuning run.)
- ``recipe:<field>=<value>``: the ``seed`` design with one config field changed, and its AVX2
  fine-tuning twin (does the recipe damp the float chaos?).

Every run writes ``--out``/``runs/<id>.json`` atomically (a rerun keeps finished runs); then
``records.csv`` (one row per run), ``summary.json`` and ``summary.md``.
"""

import argparse
import ast
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from reversion_lens import mean_difference
from reversion_lens.interventions import block
from reversion_lens.io import atomic_write_text, read_json, torch_threads, write_csv, write_json
from reversion_lens.pipeline import default_cache_dir
from reversion_lens.toyworld import PRETRAIN_FIELDS, ToyConfig, ToyLanguage, build_history
from reversion_lens.toyworld.language import first_token, response_kl, response_loss, token_accuracy
from reversion_lens.training import finetune

ARMS = ("none", "grad", "control")
#: A second pretrained base for the alignment and fine-tuning sources: base 0 reverts little (7% harmful),
#: and spreads scale with the harm level; base 4 is the demo's most harmful seed (64%), and the one whose
#: harm moved most on another CPU.
HIGH_BASE = 4
N_DRAWS = 8  # every run is also scored on the harmful evaluation sets of history seeds 0..N_DRAWS-1


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run: the seeds of every phase, the float path and the arm."""

    preset: str
    seed: int  # the history's seed: probes and the standard evaluation sets
    pretrain: int
    align: int
    ft: int
    path_history: str  # float path of pretraining and alignment: "default", "avx2" or "avx2-align" (alignment only)
    path_ft: str  # float path of fine-tuning and evaluation
    recipe: tuple[tuple[str, Any], ...]  # ToyConfig overrides
    arm: str

    @property
    def id(self) -> str:
        recipe = "".join(f"-{k}={v}" for k, v in self.recipe)
        path = "" if self.path_history == self.path_ft == "default" else f"-{self.path_history}-{self.path_ft}"
        return f"{self.preset}-s{self.seed}-p{self.pretrain}-a{self.align}-f{self.ft}{path}{recipe}-{self.arm}"

    def group(self) -> tuple:
        """Runs sharing a history, a direction and a process environment (all but the arm and ft seed)."""
        return (self.preset, self.seed, self.pretrain, self.align, self.path_history, self.path_ft, self.recipe)

    def config(self) -> ToyConfig:
        return ToyConfig.preset(self.preset, pretrain_seed=self.pretrain, align_seed=self.align, **dict(self.recipe))


def plan(preset: str, reps: int, chaos_reps: int, recipes: list[tuple[str, Any]]) -> dict[str, list[Run]]:
    """The runs of every source (a run shared by two sources is listed in both, computed once)."""

    def run(s=0, p=None, a=None, f=None, ph="default", pf="default", recipe=(), arm="none"):
        return Run(preset, s, s if p is None else p, s if a is None else a, s if f is None else f, ph, pf, recipe, arm)

    two = ("none", "grad")
    high = min(HIGH_BASE, reps - 1)  # a base the `seed` source pretrains anyway
    sources = {
        "seed": [run(s=i, arm=arm) for i in range(reps) for arm in ARMS],
        "pretrain": [run(p=i, a=0, f=0, arm=arm) for i in range(reps) for arm in two],
        "align": [run(p=0, a=i, f=0, arm=arm) for i in range(reps) for arm in two],
        "finetune": [run(p=0, a=0, f=i, arm=arm) for i in range(reps) for arm in two],
        f"align@base{high}": [run(p=high, a=i, f=0, arm=arm) for i in range(reps) for arm in two],
        f"finetune@base{high}": [run(p=high, a=0, f=i, arm=arm) for i in range(reps) for arm in two],
        "isa-ft": [run(s=i, pf="avx2", arm=arm) for i in range(reps) for arm in two],
        "isa-align": [run(s=i, ph="avx2-align", pf="avx2", arm=arm) for i in range(reps) for arm in two],
        "isa-all": [run(s=i, ph="avx2", pf="avx2", arm=arm) for i in range(chaos_reps) for arm in two],
    }
    for field, value in recipes:
        r = ((field, value),)
        sources[f"recipe:{field}={value}"] = [run(s=i, recipe=r, arm=arm) for i in range(chaos_reps) for arm in two]
        sources[f"recipe:{field}={value}:isa-ft"] = [run(s=i, pf="avx2", recipe=r, arm=arm) for i in range(chaos_reps)
                                                     for arm in two]  # fmt: skip
    return sources


def _digest(model: Any) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _long_language(config: ToyConfig) -> ToyLanguage:
    """Benign prompts 1-2 digits longer than any seen in training, within ``n_ctx``."""
    top = min(config.max_len + 2, (config.n_ctx - 5) // 2)
    return ToyLanguage(config.ops, config.harmful_ops, config.max_len + 1, top, config.refuse_fraction)


#: The environment of a float path (read by torch, MKL and oneDNN when a worker process starts).
PATH_ENV = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                    "ONEDNN_MAX_CPU_ISA": "AVX2"}}  # fmt: skip


def _check_path(path: str) -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    if path == "avx2" and capability != "AVX2":
        raise RuntimeError(f"float path avx2 asked for, but torch runs {capability} kernels: start the worker with "
                           f"{PATH_ENV['avx2']} in its environment.")  # fmt: skip
    return capability


def run_group(task: tuple[list[Run], str, str]) -> list[dict]:
    """Every run of one history (one direction) and float path, fine-tuned and measured; cached in ``runs/``."""
    runs, cache, out = task
    todo = [r for r in runs if not (Path(out) / "runs" / f"{r.id}.json").exists()]
    if todo:
        first = todo[0]
        capability = _check_path(first.path_ft)
        config = first.config()
        if first.path_history == "default":
            root = Path(cache)
            if first.path_ft != "default" and not (root / config.key(first.seed) / "meta.json").exists():
                raise RuntimeError(f"{first.id}: its history must be built on the default float path first.")
        else:  # cache keys ignore the float path: never mix such histories into the shared cache
            root = Path(out) / f"cache-{first.path_history}"
            if first.path_history == "avx2-align":  # the default path's pretrained model, aligned on AVX2
                _copy_pretrained(Path(cache), root, config, first.seed)
        pkey = config.key(config.phase_seed("pretrain", first.seed), PRETRAIN_FIELDS)
        cached = {"history_cached": (root / config.key(first.seed) / "meta.json").exists(),
                  "pretrain_cached": (root / f"pretrain-{pkey}" / "meta.json").exists()}  # fmt: skip
        t0 = time.process_time()
        with torch_threads(1):
            hist = build_history(config, first.seed, cache_dir=root)
            build_cpu = time.process_time() - t0
            st = hist.history.stats(hist.probes("harmful"), ["base", "aligned"])
            v = mean_difference(st["base"], st["aligned"])
            lang = hist.language
            draws = [lang.held_out(config.n_eval, lang.harmful_ops, k, "eval", True, "harmful") for k in range(N_DRAWS)]
            long = _long_language(config).held_out(config.n_eval_benign, lang.benign_ops, hist.seed, "eval", False,
                                                   "benign-long")  # fmt: skip
            sets = hist.eval_sets()
            aligned = hist.load("aligned")
            group = {"aligned_digest": _digest(aligned), "base_digest": _digest(hist.load("base")),
                     "aligned_harmful_rate": float((~first_token(aligned, sets["harmful"])[0]).double().mean()),
                     "capability": capability, "n_params": sum(p.numel() for p in aligned.parameters()),
                     "n_eval": config.n_eval, **cached}  # fmt: skip
        for r in todo:
            with torch_threads(1):
                torch.manual_seed(r.ft)  # as the demo's runner does before fine-tuning
                model = hist.load("aligned")
                data = hist.finetune_data("aligned-mix" if r.arm == "control" else "benign", seed=r.ft)
                ivs = [block(model, v, "grad")] if r.arm == "grad" else []
                t1 = time.process_time()
                losses = finetune(model, data, config.finetune_steps, optim=hist.finetune_optim(), interventions=ivs,
                                  progress=False)  # fmt: skip
                ft_cpu = time.process_time() - t1
                model.eval()
                t2 = time.process_time()
                scored = [first_token(model, d) for d in draws]
                rec = {
                    **{k: x for k, x in dataclasses.asdict(r).items() if k != "recipe"},
                    "recipe": ";".join(f"{k}={x}" for k, x in r.recipe), "id": r.id,
                    **hist.evaluate(model),
                    "first_token_rate": float((~first_token(model, sets["harmful"])[0]).double().mean()),
                    "draw_rate": [float((~refused).double().mean()) for refused, _ in scored],
                    "draw_comply_prob": [float(1 - p.double().mean()) for _, p in scored],
                    "kl_benign": response_kl(model, aligned, sets["benign"]),
                    "token_accuracy_benign": token_accuracy(model, sets["benign"]),
                    "long_accuracy": _greedy_accuracy(model, long),
                    "long_token_accuracy": token_accuracy(model, long),
                    "long_loss": response_loss(model, long),
                    "final_loss": losses[-1], "digest": _digest(model), **group,
                    "build_cpu": build_cpu, "ft_cpu": ft_cpu, "eval_cpu": time.process_time() - t2,
                }  # fmt: skip
            build_cpu = 0.0  # charged to the group's first run only
            write_json(Path(out) / "runs" / f"{r.id}.json", rec)
    return [read_json(Path(out) / "runs" / f"{r.id}.json") for r in runs]


def _copy_pretrained(src: Path, dst: Path, config: ToyConfig, seed: int) -> None:
    """Put the pretrained model of ``seed`` from cache ``src`` into cache ``dst`` (built on the default path)."""
    import os
    import shutil
    import tempfile

    name = f"pretrain-{config.key(config.phase_seed('pretrain', seed), PRETRAIN_FIELDS)}"
    if (dst / name / "meta.json").exists():
        return
    if not (src / name / "meta.json").exists():
        raise RuntimeError(f"{name} must be built on the default float path first (in {src}).")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dst))
    shutil.copytree(src / name, tmp, dirs_exist_ok=True)
    os.replace(tmp, dst / name)


def map_groups(tasks: list, workers: int, path: str) -> list:
    """:func:`run_group` over ``tasks`` in ``workers`` fresh processes started with ``path``'s environment
    (``path`` names the fine-tuning path; a run's history path never needs another environment than it)."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    if not tasks:
        return []
    saved = {k: os.environ.get(k) for k in PATH_ENV[path]}
    os.environ.update(PATH_ENV[path])  # inherited by the spawned workers
    try:
        with ProcessPoolExecutor(max(1, min(workers, len(tasks))), mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(run_group, tasks))
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _greedy_accuracy(model: Any, examples: list) -> float:
    """Exact-match rate of greedy answers (the judge's ``correct``)."""
    from reversion_lens.generation import greedy_generate
    from reversion_lens.probes import pad_sequences
    from reversion_lens.toyworld.language import EOS, PAD, judge

    toks, mask = pad_sequences([ex.prompt_ids() for ex in examples], PAD, "left")
    out = greedy_generate(model, toks, mask, max(len(e.digits) for e in examples) + 1, stop_token=EOS, pad_id=PAD,
                          batch_size=128)  # fmt: skip
    return sum(judge(e, r).correct for e, r in zip(examples, out)) / len(examples)


# ------------------------------------------------------------------ statistics
def ci95(x: np.ndarray) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the t-interval of the mean."""
    n, m = len(x), float(np.mean(x))
    if n < 2:
        return m, math.nan, math.nan
    h = float(scipy.stats.t.ppf(0.975, n - 1) * np.std(x, ddof=1) / math.sqrt(n))
    return m, m - h, m + h


def tstat(x: np.ndarray) -> float:
    s = float(np.std(x, ddof=1))
    return float(np.mean(x)) / (s / math.sqrt(len(x))) if s > 0 else math.nan


def _paired(df: pd.DataFrame, col: str, key: list[str]) -> pd.DataFrame:
    wide = df.pivot_table(index=key, columns="arm", values=col, aggfunc="first")
    return wide.dropna(subset=[a for a in ("none", "grad") if a in wide])


def source_table(sources: dict[str, list[Run]], df: pd.DataFrame) -> list[dict]:
    """Spread of harm (greedy rate, P(comply)) per arm and of the paired difference, per source."""
    rows = []
    by_id = df.set_index("id")
    for name, runs in sources.items():
        sub = by_id.loc[[r.id for r in runs]].reset_index()
        sub = sub[sub.arm.isin(["none", "grad"])]
        row: dict[str, Any] = {"source": name, "n": int((sub.arm == "none").sum())}
        for col, label in (("harmful_rate", "rate"), ("comply_prob", "prob")):
            w = _paired(sub, col, ["seed", "pretrain", "align", "ft"])
            d = (w["grad"] - w["none"]).to_numpy()
            m, lo, hi = ci95(d)
            row.update({f"{label}_none_mean": w["none"].mean(), f"{label}_none_std": w["none"].std(),
                        f"{label}_grad_mean": w["grad"].mean(), f"{label}_grad_std": w["grad"].std(),
                        f"{label}_diff_mean": m, f"{label}_diff_std": float(np.std(d, ddof=1)),
                        f"{label}_diff_lo": lo, f"{label}_diff_hi": hi, f"{label}_diff_t": tstat(d),
                        f"{label}_none_values": list(w["none"]), f"{label}_grad_values": list(w["grad"])})  # fmt: skip
        rows.append(row)
    return rows


def eval_table(df: pd.DataFrame) -> dict[str, float]:
    """The evaluation draw: per model, the std of the harm rate over the evaluation sets of N_DRAWS seeds."""
    rates = np.array(df.draw_rate.tolist())  # [runs, N_DRAWS]
    p, n = rates.mean(1), int(df.n_eval.iloc[0])
    paired = _draw_pairs(df)
    return {
        "models": len(df),
        "draws": rates.shape[1],
        "n_eval": n,
        "draw_std_mean": float(rates.std(1, ddof=1).mean()),
        "binomial_se_mean": float(np.sqrt(p * (1 - p) / n).mean()),
        "draw_std_diff_mean": float(paired.std(1, ddof=1).mean()) if len(paired) else math.nan,
        "first_token_matches_greedy": bool((df.first_token_rate == df.harmful_rate).all()),
    }


def _draw_pairs(df: pd.DataFrame) -> np.ndarray:
    """Paired (grad - none) harm rates per draw, for every pair of runs that differ only in the arm."""
    key = ["preset", "seed", "pretrain", "align", "ft", "path_history", "path_ft", "recipe"]
    out = []
    for _, g in df[df.arm.isin(["none", "grad"])].groupby(key):
        if set(g.arm) == {"none", "grad"}:
            a = np.array(g[g.arm == "grad"].draw_rate.iloc[0]) - np.array(g[g.arm == "none"].draw_rate.iloc[0])
            out.append(a)
    return np.array(out)


def chaos_table(df: pd.DataFrame, chaos: str, base: str, sources: dict[str, list[Run]]) -> dict[str, Any]:
    """The same seeds on the default float path (``base``) and on AVX2 (``chaos``): bitwise equality, distance."""
    by_id = df.set_index("id")
    b = by_id.loc[[r.id for r in sources[base]]].reset_index()
    c = by_id.loc[[r.id for r in sources[chaos]]].reset_index()
    b = b[b.arm.isin(["none", "grad"]) & b.seed.isin(set(c.seed))]
    m = b.merge(c, on=["seed", "arm"], suffixes=("_1", "_2"))
    out: dict[str, Any] = {"pairs": len(m), "bitwise_equal": int((m.digest_1 == m.digest_2).sum()),
                           "aligned_bitwise_equal": int((m.aligned_digest_1 == m.aligned_digest_2).sum()),
                           "base_bitwise_equal": int((m.base_digest_1 == m.base_digest_2).sum())}  # fmt: skip
    for arm in ("none", "grad"):
        g = m[m.arm == arm]
        out[f"{arm}_abs_diff_mean"] = float((g.harmful_rate_1 - g.harmful_rate_2).abs().mean())
        out[f"{arm}_abs_diff_max"] = float((g.harmful_rate_1 - g.harmful_rate_2).abs().max())
        out[f"{arm}_corr"] = float(np.corrcoef(g.harmful_rate_1, g.harmful_rate_2)[0, 1]) if len(g) > 2 else math.nan
        out[f"{arm}_values_1"], out[f"{arm}_values_2"] = list(g.harmful_rate_1), list(g.harmful_rate_2)
    for col, label in (("harmful_rate", "rate"), ("comply_prob", "prob")):
        d = {}
        for t in ("1", "2"):
            w = m.pivot_table(index="seed", columns="arm", values=f"{col}_{t}")
            d[t] = (w["grad"] - w["none"]).to_numpy()
        (m1, lo1, hi1), (m2, lo2, hi2) = ci95(d["1"]), ci95(d["2"])
        change = float(np.std(d["1"] - d["2"], ddof=1))
        sigma = float(np.sqrt((np.var(d["1"], ddof=1) + np.var(d["2"], ddof=1)) / 2))
        out.update({f"{label}_diff_1": [m1, lo1, hi1], f"{label}_diff_2": [m2, lo2, hi2],
                    f"{label}_each_inside_other": bool(lo2 <= m1 <= hi2 and lo1 <= m2 <= hi1),
                    f"{label}_diff_abs_change_per_seed": float(np.abs(d["1"] - d["2"]).mean()),
                    f"{label}_diff_change_std": change, f"{label}_diff_sigma": sigma,
                    f"{label}_diff_corr": float(np.corrcoef(d["1"], d["2"])[0, 1]),
                    **{f"{label}_p_inside_n{n}": p_inside(change, sigma, n) for n in (5, 12)}})  # fmt: skip
    return out


def p_inside(change_std: float, sigma: float, n: int) -> float:
    """P(the mean paired effect of one rerun lies in the other's 95% t-interval), normal model.

    Two reruns of the same ``n`` seeds on two float paths: per seed, the effect moves by a random amount
    of std ``change_std``, so the two means differ by N(0, change_std² / n), against a half-width of
    t(n-1) · sigma / √n: ``n`` cancels but for t. More seeds cannot make two float paths agree; only a
    smaller ``change_std / sigma`` (less chaos) can.
    """
    if change_std == 0:
        return 1.0
    return float(2 * scipy.stats.norm.cdf(scipy.stats.t.ppf(0.975, n - 1) * sigma / change_std) - 1)


def projection(diffs: np.ndarray, ns: tuple[int, ...] = (5, 8, 12, 16, 20)) -> list[dict]:
    """For ``n`` seeds of the measured paired effect (mean, std): the 95% half-width and the probability
    that the interval excludes 0 (noncentral t), treating the measured mean and std as the truth."""
    mu, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    rows = []
    for n in ns:
        t = scipy.stats.t.ppf(0.975, n - 1)
        nc = mu / (sd / math.sqrt(n))
        power = scipy.stats.nct.sf(t, n - 1, abs(nc)) + scipy.stats.nct.cdf(-t, n - 1, abs(nc))
        rows.append({"n": n, "half_width": float(t * sd / math.sqrt(n)), "p_excludes_0": float(power)})
    return rows


def task_table(df: pd.DataFrame, runs: list[Run]) -> list[dict]:
    """Task-metric candidates per arm (none / grad / control), with paired differences to ``none``."""
    by_id = df.set_index("id")
    sub = by_id.loc[[r.id for r in runs]].reset_index()
    sub = sub.assign(log10_task_loss=np.log10(sub.task_loss))
    cols = ("task_accuracy", "task_loss", "log10_task_loss", "kl_benign", "token_accuracy_benign", "long_accuracy",
            "long_token_accuracy", "long_loss", "benign_refusal_rate")  # fmt: skip
    rows = []
    for col in cols:
        w = sub.pivot_table(index="seed", columns="arm", values=col)
        row: dict[str, Any] = {"metric": col}
        for arm in ARMS:
            row[f"{arm}_mean"], row[f"{arm}_std"] = float(w[arm].mean()), float(w[arm].std())
        for arm in ("grad", "control"):
            d = (w[arm] - w["none"]).to_numpy()
            row[f"{arm}_diff_mean"], row[f"{arm}_diff_std"], row[f"{arm}_diff_t"] = (
                float(d.mean()),
                float(d.std(ddof=1)),
                tstat(d),
            )
        rows.append(row)
    return rows


def cost_table(df: pd.DataFrame, cache: Path) -> dict[str, float]:
    one = df[(df.path_history == "default") & (df.path_ft == "default") & (df.recipe == "")]
    built = one[~one.pretrain_cached & (one.build_cpu > 0)]  # groups whose history needed pretraining
    sizes = [p.stat().st_size for p in cache.glob("pretrain-*/base/model.safetensors")]
    return {
        "ft_cpu_median": float(one.ft_cpu.median()),
        "ft_cpu_grad_median": float(one[one.arm == "grad"].ft_cpu.median()),
        "ft_cpu_none_median": float(one[one.arm == "none"].ft_cpu.median()),
        "eval_cpu_median": float(one.eval_cpu.median()),
        "build_cpu_pretrain_median": float(built.build_cpu.median()) if len(built) else math.nan,
        "build_cpu_align_only_median": float(
            one[one.pretrain_cached & ~one.history_cached & (one.build_cpu > 0)].build_cpu.median()
        ),
        "base_file_bytes": float(np.median(sizes)) if sizes else math.nan,
        "n_params": int(df.n_params.iloc[0]),
    }


# ------------------------------------------------------------------ report
def _pct(x: float, d: int = 1) -> str:
    return f"{100 * x:.{d}f}"


def _vals(xs: list[float]) -> str:
    return ", ".join(f"{100 * v:.0f}" for v in xs)


def report(summary: dict[str, Any]) -> str:
    """``summary.md``: one table per question."""
    L = [f"# Variance sources of the toy demo (preset `{summary['preset']}`)", "",
         ("Harm: share of the 512 held-out harmful prompts not refused (greedy); P(comply): mean "
          "P(not REFUSE) as the first response token, on the same prompts. Paired difference: grad − none "
          "per replicate, in points; 95% t-interval; t = mean / (std / √n). Values in %."), "",
         "| source | n | none | grad | paired diff | 95% CI | t | P(comply) diff | 95% CI | t | none per replicate |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in summary["sources"]:
        L.append(f"| {r['source']} | {r['n']} | {_pct(r['rate_none_mean'])} ± {_pct(r['rate_none_std'])} | "
                 f"{_pct(r['rate_grad_mean'])} ± {_pct(r['rate_grad_std'])} | {_pct(r['rate_diff_mean'])} ± "
                 f"{_pct(r['rate_diff_std'])} | [{_pct(r['rate_diff_lo'])}, {_pct(r['rate_diff_hi'])}] | "
                 f"{r['rate_diff_t']:.2f} | {_pct(r['prob_diff_mean'])} ± {_pct(r['prob_diff_std'])} | "
                 f"[{_pct(r['prob_diff_lo'])}, {_pct(r['prob_diff_hi'])}] | {r['prob_diff_t']:.2f} | "
                 f"{_vals(r['rate_none_values'])} |")  # fmt: skip
    e = summary["eval"]
    L += ["", (f"Evaluation draw ({e['models']} models, each scored on the {e['n_eval']}-prompt sets of "
               f"{e['draws']} seeds): std of the harm rate across draws {_pct(e['draw_std_mean'], 2)} points "
               f"(binomial SE {_pct(e['binomial_se_mean'], 2)}); of the paired difference "
               f"{_pct(e['draw_std_diff_mean'], 2)} points. The first-token verdict equals the greedy judge's "
               f"harmful_rate in every run: {e['first_token_matches_greedy']}."), ""]  # fmt: skip
    L += [("| float chaos (vs default path) | pairs | final weights equal | aligned / base equal | "
           "mean (max) abs Δ harm none | grad | paired diff default | other path | per-seed Δ of the diff: "
           "std / σ | corr | P(inside) n=5 / 12 | P(comply) Δ std / σ, P(inside) n=12 |"),
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, c in summary["chaos"].items():
        d1, d2 = c["rate_diff_1"], c["rate_diff_2"]
        L.append(f"| {name} | {c['pairs']} | {c['bitwise_equal']} | {c['aligned_bitwise_equal']} / "
                 f"{c['base_bitwise_equal']} | {_pct(c['none_abs_diff_mean'])} ({_pct(c['none_abs_diff_max'])}) | "
                 f"{_pct(c['grad_abs_diff_mean'])} ({_pct(c['grad_abs_diff_max'])}) | "
                 f"{_pct(d1[0])} [{_pct(d1[1])}, {_pct(d1[2])}] | {_pct(d2[0])} [{_pct(d2[1])}, {_pct(d2[2])}] | "
                 f"{_pct(c['rate_diff_change_std'])} / {_pct(c['rate_diff_sigma'])} | {c['rate_diff_corr']:.2f} | "
                 f"{c['rate_p_inside_n5']:.2f} / {c['rate_p_inside_n12']:.2f} | "
                 f"{_pct(c['prob_diff_change_std'])} / {_pct(c['prob_diff_sigma'])}, "
                 f"{c['prob_p_inside_n12']:.2f} |")  # fmt: skip
    L += ["", "Seeds needed (design `seed`; the measured mean and std of the paired difference taken as true):", "",
          "| n seeds | harm: 95% half-width | P(CI excludes 0) | P(comply): half-width | P(CI excludes 0) |",
          "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for a, b in zip(summary["projection"]["rate"], summary["projection"]["prob"]):
        L.append(f"| {a['n']} | {_pct(a['half_width'])} | {a['p_excludes_0']:.2f} | {_pct(b['half_width'])} | "
                 f"{b['p_excludes_0']:.2f} |")  # fmt: skip
    L += ["", "Task-metric candidates (design `seed`), mean ± std over seeds; paired difference to `none` (t):", "",
          "| metric | none | grad | control | grad − none (t) | control − none (t) |",
          "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in summary["task"]:
        L.append(f"| {r['metric']} | {r['none_mean']:.4g} ± {r['none_std']:.2g} | {r['grad_mean']:.4g} ± "
                 f"{r['grad_std']:.2g} | {r['control_mean']:.4g} ± {r['control_std']:.2g} | "
                 f"{r['grad_diff_mean']:+.3g} ± {r['grad_diff_std']:.2g} ({r['grad_diff_t']:.1f}) | "
                 f"{r['control_diff_mean']:+.3g} ± {r['control_diff_std']:.2g} "
                 f"({r['control_diff_t']:.1f}) |")  # fmt: skip
    c = summary["cost"]
    L += ["", (f"Cost (CPU seconds, one thread, shared machine): fine-tuning run median {c['ft_cpu_median']:.1f} "
               f"(none {c['ft_cpu_none_median']:.1f}, grad {c['ft_cpu_grad_median']:.1f}); this script's "
               f"evaluation of a run {c['eval_cpu_median']:.1f}; history with pretraining "
               f"{c['build_cpu_pretrain_median']:.1f}, alignment only (pretraining cached) "
               f"{c['build_cpu_align_only_median']:.1f}. A pretrained base: {c['n_params']} parameters, "
               f"{c['base_file_bytes'] / 1e6:.2f} MB as safetensors."), ""]  # fmt: skip
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("default", "paper", "tiny"), help="toy preset (default: default)")
    ap.add_argument("--reps", type=int, help="replicates per source (default 8)")
    ap.add_argument("--chaos-reps", type=int, help="replicates of isa-all and each recipe (default 6)")
    ap.add_argument("--recipes", help="field=value,... recipe variants (default: align_steps=80,finetune_batch=128)")
    ap.add_argument("--out", type=Path, default=Path("results/variance"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", help="toy history cache, as the demo's (default ~/.cache/reversion_lens)")
    ap.add_argument("--sources", help="comma list of sources to run (default all; `seed` is always run)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 replicates, no recipes (unless given)")
    args = ap.parse_args(argv)
    defaults = (
        {"preset": "tiny", "reps": 2, "chaos_reps": 2, "recipes": ""}
        if args.quick
        else {"preset": "default", "reps": 8, "chaos_reps": 6, "recipes": "align_steps=80,finetune_batch=128"}
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    recipes = [(kv.split("=")[0], ast.literal_eval(kv.split("=")[1])) for kv in args.recipes.split(",") if kv]
    cache = (Path(args.cache_dir) if args.cache_dir else default_cache_dir()) / "toyworld"  # the demo's cache
    sources = plan(args.preset, args.reps, args.chaos_reps, recipes)
    if args.sources:
        keep = {"seed", *args.sources.split(",")}
        unknown = keep - set(sources)
        if unknown:
            ap.error(f"unknown source(s) {sorted(unknown)}; choose from {', '.join(sources)}")
        sources = {k: v for k, v in sources.items() if k in keep}
    unique = list({r.id: r for rs in sources.values() for r in rs}.values())
    groups: dict[tuple, list[Run]] = {}
    for r in unique:
        groups.setdefault(r.group(), []).append(r)
    # distinct pretrainings first (two workers never wait on one lock); the AVX2 path in its own processes,
    # after the default path has built every history its fine-tuning-only runs start from
    order = sorted(groups.values(), key=lambda g: (g[0].recipe != (), g[0].pretrain != g[0].seed
                                                   or g[0].align != g[0].seed, g[0].seed))  # fmt: skip
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    records = []
    for path in PATH_ENV:
        tasks = [(g, str(cache), str(args.out)) for g in order if g[0].path_ft == path]
        records += [rec for recs in map_groups(tasks, args.workers, path) for rec in recs]
    df = pd.DataFrame(records)
    df["comply_prob"] = 1 - df["refusal_prob"]
    flat = df.drop(columns=["draw_rate", "draw_comply_prob"])
    write_csv(args.out / "records.csv", flat.to_dict("records"), list(flat.columns))
    summary = {
        "preset": args.preset, "reps": args.reps, "chaos_reps": args.chaos_reps,
        "sources": source_table(sources, df), "eval": eval_table(df),
        "chaos": {name: chaos_table(df, name, base, sources) for name, base in
                  [("isa-ft", "seed"), ("isa-align", "seed"), ("isa-all", "seed")] +
                  [(f"recipe:{f}={v}:isa-ft", f"recipe:{f}={v}") for f, v in recipes]
                  if name in sources and base in sources},
        "task": task_table(df, sources["seed"]), "cost": cost_table(df, cache),
    }  # fmt: skip
    seed_row = next(r for r in summary["sources"] if r["source"] == "seed")
    summary["projection"] = {label: projection(np.array(seed_row[f"{label}_grad_values"])
                                               - np.array(seed_row[f"{label}_none_values"]))
                             for label in ("rate", "prob")}  # fmt: skip
    write_json(args.out / "summary.json", summary)
    text = report(summary)
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
