"""Figures are checked by content (traces, values, titles), built from small fixed tables."""

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from scipy import stats as sps

from reversion_lens import figures
from reversion_lens.errors import ResultsFormatError, SiteError

ARMS = ["none", "grad:v_rev", "grad:random"]
SEEDS = [0, 1]
STEPS = [0, 1, 2, 5]
LAYERS = [0, 1]
D_MODEL = 64
ATOL = 1e-12


def make_traj() -> pd.DataFrame:
    """Fixed numbers: cos rises with step for 'none', stays small for 'grad:v_rev'; NaN at step 0."""
    base = {"none": 0.5, "grad:v_rev": 0.05, "grad:random": 0.45}
    rows = []
    for arm in ARMS:
        for seed in SEEDS:
            for layer in LAYERS:
                iso = 0.288 + 0.001 * seed  # per run; the figure shows the mean over runs
                matched = 0.30 + 0.02 * seed + 0.01 * ARMS.index(arm) + 0.05 * layer
                for step in STEPS:
                    cos = np.nan if step == 0 else base[arm] * (0.6 + 0.08 * step) + 0.1 * layer - 0.03 * seed
                    wobble = 0.03 * ((step + 2 * seed + layer) % 3)  # keeps Spearman's rho below 1
                    harm = np.nan if step == 1 else min(1.0, 0.05 + (0.0 if np.isnan(cos) else cos) * 0.6 + wobble)
                    rows.append(
                        dict(
                            seed=seed,
                            arm=arm,
                            step=step,
                            layer=layer,
                            cos=cos,
                            projection=0.1 * step,
                            drift_norm=0.2 * step,
                            reversion_ratio=0.01 * step,
                            null_p99_isotropic=iso,
                            null_p99_matched=matched,
                            harmful_rate=harm,
                            task_accuracy=0.8,
                            task_loss=1.2 - 0.01 * step,
                        )
                    )
    return pd.DataFrame(rows)


def make_runs() -> pd.DataFrame:
    final = make_traj().query("step == 5 and layer == 1")
    return final.rename(columns={"cos": "final_cos"})[
        ["seed", "arm", "final_cos", "harmful_rate", "task_accuracy", "task_loss"]
    ].reset_index(drop=True)


def make_layer_ablation() -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        for b, h, c in [
            ("random", 0.6, 0.5),
            ("1", 0.3, 0.2),
            ("none", 0.62, 0.55),
            ("all", 0.1, 0.02),
            ("0", 0.5, 0.4),
        ]:
            rows.append(dict(seed=seed, blocked=b, harmful_rate=h + 0.02 * seed, final_cos=c - 0.01 * seed))
    return pd.DataFrame(rows)


def make_vocab() -> pd.DataFrame:
    toks = {
        "top": [" Sure", " Here", " step", "!", " first"],
        "bottom": [" sorry", " cannot", " Sorry", "\n", " apolog"],
    }
    rows = []
    for layer in LAYERS:
        for side, ts in toks.items():
            for r, t in enumerate(ts, start=1):
                rows.append(
                    dict(layer=layer, side=side, rank=r, token=t, score=(1 if side == "top" else -1) * (3 - 0.4 * r))
                )
    return pd.DataFrame(rows)


def exact_p99(d: int) -> float:
    a = (d - 1) / 2
    return float(2 * sps.beta.ppf(0.99, a, a) - 1)


def test_arm_colors_fixed_and_order_independent():
    a = figures.arm_colors(["grad:random", "none", "my-new-arm", "grad:v_rev"])
    b = figures.arm_colors(["my-new-arm", "grad:v_rev", "grad:random", "none"])
    assert a == b
    from reversion_lens.registry import MODES

    assert a["none"] == figures.ARM_COLORS["none"] and a["grad:v_rev"] == MODES["grad"].meta["color"]  # the registry's
    known = figures.arm_colors(
        ["none", "control:rehearsal", "grad:random", *(f"{m}:v_rev" for m in ("grad", "clamp", "update"))]
    )
    assert len(set(known.values())) == len(known)  # the common arms never share a colour
    assert re.fullmatch(r"#[0-9A-Fa-f]{6}", a["my-new-arm"])


def test_heatmap_values_and_scale():
    traj = make_traj()
    fig = figures.alignment_heatmap(traj)
    assert [t.name for t in fig.data] == ARMS  # known arms in fixed order
    assert fig.layout.xaxis.title.text == "fine-tuning step" and fig.layout.yaxis.title.text == "layer"
    assert sum(bool(t.showscale) for t in fig.data) == 1  # one shared colour bar
    for t in fig.data:
        assert t.zmid == 0 and t.zmin == -1 and t.zmax == 1
        assert list(t.x) == ["1", "2", "5"] and list(t.y) == ["0", "1"]  # step 0 (NaN cos) left out
        for i, layer in enumerate(LAYERS):
            for j, step in enumerate([1, 2, 5]):
                vals = [r.cos for r in traj.itertuples() if r.arm == t.name and r.layer == layer and r.step == step]
                assert t.z[i][j] == pytest.approx(sum(vals) / len(vals), abs=ATOL)
                assert t.customdata[i][j][1] == 2  # n seeds in hover
        assert "std" in t.hovertemplate and f"arm={t.name}" in t.hovertemplate


def test_curves_traces_and_null_lines():
    traj = make_traj()
    fig = figures.alignment_curves(traj, layer=1)
    names = [t.name for t in fig.data]
    assert names[-2:] == ["covariance-matched null p99 (min–max over runs)", "isotropic null p99 (mean over runs)"]
    for arm in ARMS:  # band, one faint line per seed, mean
        assert names.count(arm) == 1 and names.count(f"{arm} ± std") == 1
        assert sum(n.startswith(f"{arm} seed ") for n in names) == len(SEEDS)
    assert len(fig.data) == len(ARMS) * (2 + len(SEEDS)) + 2
    at1 = traj[traj.layer == 1]
    iso = fig.data[-1]
    assert list(iso.y) == pytest.approx([at1.null_p99_isotropic.mean()] * 2, abs=ATOL)
    assert iso.y[0] == pytest.approx(0.2885, abs=ATOL)  # mean over runs of 0.288 and 0.289
    assert min(fig.data[-2].y) == pytest.approx(at1.null_p99_matched.min(), abs=ATOL)
    assert max(fig.data[-2].y) == pytest.approx(at1.null_p99_matched.max(), abs=ATOL)
    mean = next(t for t in fig.data if t.name == "none")
    want = at1[(at1.arm == "none") & (at1.step > 0)].groupby("step").cos.mean()
    assert list(mean.x) == [1, 2, 5] and np.allclose(mean.y, want.to_numpy(), atol=ATOL)
    seed_line = next(t for t in fig.data if t.name == "none seed 1")
    assert "seed=1" in seed_line.hovertemplate and "layer=1" in seed_line.hovertemplate and seed_line.opacity < 0.5
    assert fig.layout.yaxis.title.text == "cosine(drift, v_rev)" and fig.layout.template.layout.paper_bgcolor == "white"


def test_null_comparison_exact_p99_and_count():
    traj = make_traj()
    obs = traj[(traj.layer == 0)]
    fig = figures.null_comparison(obs, d_model=D_MODEL)
    p99 = exact_p99(D_MODEL)
    line = next(t for t in fig.data if t.name.startswith("isotropic p99"))
    assert line.x[0] == pytest.approx(p99, abs=1e-9) and line.x[1] == pytest.approx(p99, abs=1e-9)
    values = obs.cos.dropna().to_numpy()
    n_above = int((values > p99).sum())
    assert 0 < n_above < len(values)  # the table straddles the line, so the count is informative
    assert fig.layout.title.text == f"{n_above} of {len(values)} run-step values above the isotropic p99 ({p99:.3f})"
    dens = fig.data[0]
    assert np.trapezoid(dens.y, dens.x) == pytest.approx(1.0, abs=1e-3)  # a normalised density
    assert sum(len(t.x) for t in fig.data if t.name in ARMS) == len(values)  # every value marked
    for t in fig.data:
        if t.name in ARMS:
            assert t.marker.color == t.marker.line.color == figures.arm_colors([t.name])[t.name]
    # empirical null: the line is the samples' quantile
    samples = np.random.default_rng(0).normal(0, 0.1, 5000)
    fig2 = figures.null_comparison(values, null_samples=samples, label="matched")
    q = float(np.quantile(samples, 0.99))
    assert next(t for t in fig2.data if t.name.startswith("matched p99")).x[0] == pytest.approx(q, abs=ATOL)
    assert fig2.layout.title.text.startswith(f"{int((values > q).sum())} of {len(values)} ")


def test_ablation_summary_bars_points_and_colours():
    runs = make_runs()
    fig = figures.ablation_summary(runs)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 3 * len(ARMS) and len(fig.data) == 2 * len(bars)
    assert [b.name for b in bars[:3]] == ARMS and all(b.showlegend for b in bars[:3]) and not bars[3].showlegend
    harm = [b for b in bars if b.xaxis == "x2"]
    for b, arm in zip(harm, ARMS):
        v = 100 * runs[runs.arm == arm].harmful_rate
        assert b.y[0] == pytest.approx(v.mean(), abs=1e-9) and b.error_y.array[0] == pytest.approx(
            v.std(ddof=1), abs=1e-9
        )
    pts = [t for t in fig.data if isinstance(t, go.Scatter) and t.xaxis == "x2"]
    assert all(len(p.y) == len(SEEDS) and len(set(p.x)) == len(SEEDS) for p in pts)  # jittered seeds
    assert [fig.layout[f"yaxis{i}"].title.text for i in ("", 2, 3)] == [
        "final cosine(drift, v_rev)",
        "harmful responses (%)",
        "task accuracy (%)",
    ]
    # the same arm has the same colour here, in the curves and in the scatter
    curves = figures.alignment_curves(make_traj(), layer=1)
    scatter = figures.harm_vs_alignment(make_traj(), layer=1)
    for arm in ARMS:
        c = figures.arm_colors([arm])[arm]
        assert next(t for t in curves.data if t.name == arm).line.color == c
        assert next(t for t in scatter.data if t.name == arm).marker.color == c
        assert next(t for t in fig.data if t.name == f"{arm} seeds").marker.color == c


def test_per_layer_ablation_order_and_means():
    table = make_layer_ablation()
    fig = figures.per_layer_ablation(table)
    assert list(fig.layout.xaxis.ticktext) == ["none", "0", "1", "all", "random"]
    bars = [t for t in fig.data if isinstance(t, go.Bar) and t.xaxis == "x"]
    assert [b.name for b in bars] == ["none", "0", "1", "all", "random"]
    assert [b.marker.line.color for b in bars] == ["#D55E00", "#56B4E9", "#56B4E9", "#0072B2", "#999999"]
    for b, key in zip(bars, ["none", "0", "1", "all", "random"]):
        v = 100 * table[table.blocked == key].harmful_rate
        assert b.y[0] == pytest.approx(v.mean(), abs=1e-9)
    assert fig.layout.shapes[0].y0 == pytest.approx(100 * 0.63, abs=1e-9)  # the "none" reference line
    # integer labels as pandas reads them from a CSV without "all"/"none" still sort numerically
    ints = pd.DataFrame(dict(seed=[0, 0, 0], blocked=[10, 2, 1], harmful_rate=[0.1, 0.2, 0.3], final_cos=[0, 0, 0]))
    assert list(figures.per_layer_ablation(ints).layout.xaxis.ticktext) == ["1", "2", "10"]


def test_harm_vs_alignment_spearman():
    traj = make_traj()
    fig = figures.harm_vs_alignment(traj, layer=0)
    d = traj[(traj.layer == 0) & traj.harmful_rate.notna() & traj.cos.notna()]
    rho = sps.spearmanr(d.cos, d.harmful_rate).statistic
    got = float(re.search(r"ρ = (-?[0-9.]+)", fig.layout.title.text).group(1))
    assert 0.5 < rho < 0.999  # a non-trivial value
    assert got == pytest.approx(rho, abs=5e-4) and f"n = {len(d)}" in fig.layout.title.text
    assert [t.name for t in fig.data] == ARMS and sum(len(t.x) for t in fig.data) == len(d)
    assert all("seed=" in t.hovertemplate and "step=" in t.hovertemplate for t in fig.data)
    assert (
        fig.layout.xaxis.title.text == "cosine(drift, v_rev)" and fig.layout.yaxis.title.text == "harmful responses (%)"
    )


def test_vocab_readout_order():
    fig = figures.vocab_readout(make_vocab(), layer=1)
    assert [t.name for t in fig.data] == ["top", "bottom"]
    assert list(fig.layout.yaxis.ticktext) == ["␣Sure", "␣Here", "␣step", "!", "␣first"]
    assert list(fig.layout.yaxis2.ticktext)[3] == "\\n"
    assert list(fig.data[0].x) == pytest.approx([2.6, 2.2, 1.8, 1.4, 1.0], abs=1e-9)


@pytest.mark.parametrize(
    "builder, kwargs",
    [
        (figures.alignment_heatmap, {}),
        (figures.alignment_curves, {"layer": 0}),
        (figures.harm_vs_alignment, {"layer": 0}),
    ],
)
def test_bad_tables_raise(builder, kwargs):
    with pytest.raises(ResultsFormatError, match=r"trajectories table.*missing \['cos'\]"):
        builder(make_traj().drop(columns=["cos"]), **kwargs)
    with pytest.raises(ResultsFormatError, match="empty"):
        builder(make_traj().iloc[:0], **kwargs)


def test_other_bad_inputs():
    with pytest.raises(ResultsFormatError, match=r"missing \['final_cos'\]"):
        figures.ablation_summary(make_runs().drop(columns=["final_cos"]))
    with pytest.raises(ResultsFormatError, match="divide by 100"):
        figures.ablation_summary(make_runs().assign(harmful_rate=lambda d: 100 * d.harmful_rate + 5))
    with pytest.raises(SiteError, match=r"layer 7 is not in the table"):
        figures.alignment_curves(make_traj(), layer=7)
    with pytest.raises(ResultsFormatError, match="not in the table"):
        figures.alignment_heatmap(make_traj(), arms=["none", "clamp:v_rev"])
