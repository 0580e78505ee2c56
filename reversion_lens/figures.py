"""Plotly builders for the paper figures. They read result tables and return ``go.Figure``.

Nothing here runs a model, writes a file or calls ``.show()``: ``analyses/`` and
:func:`reversion_lens.export.write_figures` do the writing. Every builder validates its table and
raises :class:`~reversion_lens.errors.ResultsFormatError` (missing columns, no rows) with the fix.

Tables (as read from the results folder's CSV files):

=================  ==========================================================================
trajectories       one row per (seed, arm, step, layer): ``cos`` = cosine(drift, v_rev),
                   ``projection, drift_norm, reversion_ratio, null_p99_isotropic,
                   null_p99_matched, harmful_rate, task_accuracy, task_loss`` (NaN where
                   nothing was evaluated; ``cos`` is NaN at step 0)
runs               one row per (seed, arm): ``final_cos, harmful_rate, task_accuracy, task_loss``
layer ablation     one row per (seed, blocked): ``blocked`` in {"none", "0", "1", ..., "all",
                   "random"}, ``harmful_rate, final_cos``
vocab readout      ``layer, side ("top" | "bottom"), rank, token, score``
=================  ==========================================================================

Rates are fractions in [0, 1] in the tables and are shown as percentages. Standard deviations
are across seeds with ``ddof=1`` (0 when there is a single seed).
"""

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats as _sps

from .errors import ResultsFormatError, ReversionLensError, SiteError

__all__ = [
    "ARM_COLORS",
    "arm_colors",
    "arm_order",
    "alignment_heatmap",
    "alignment_curves",
    "null_comparison",
    "ablation_summary",
    "per_layer_ablation",
    "harm_vs_alignment",
    "vocab_readout",
    "isotropic_p99",
]

#: Colours of the arms that are not an intervention (Okabe-Ito, colour-blind safe). An intervention arm
#: ``<mode>:v_rev`` takes its mode's colour from the mode registry (``reversion_lens.registry.MODES``);
#: ``<mode>:random`` controls are grey, and ``@<layers>`` variants a lighter shade of their mode's colour.
ARM_COLORS: dict[str, str] = {
    "none": "#D55E00",
    "control:rehearsal": "#E69F00",
    "control:aligned-mix": "#E69F00",
}
RANDOM_COLOR = "#999999"
# Unknown arms: Paul Tol's "muted" palette, picked by a stable hash of the name.
_EXTRA_PALETTE = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")

COS_LABEL = "cosine(drift, v_rev)"
HARM_LABEL = "harmful responses (%)"
STEP_LABEL = "fine-tuning step"
WIDTH = 900
_LAYOUT = dict(template="plotly_white", width=WIDTH, font=dict(size=13), title=dict(x=0.02, xanchor="left"))

TRAJ = "the trajectories table (one row per seed, arm, step, layer)"
RUNS = "the runs summary table (one row per seed, arm)"
LAYER_ABL = "the per-layer ablation table (one row per seed, blocked layer)"
VOCAB = "the vocabulary readout table (layer, side, rank, token, score)"


def arm_colors(arms: Iterable[str]) -> dict[str, str]:
    """One colour per arm, the same in every figure and call, whatever order the arms come in.

    ``none`` and the data control have fixed colours; ``<mode>:v_rev`` the colour its mode registered
    (``MODES.register(..., color=...)``); ``<mode>:random`` grey; any other name a palette colour chosen
    by a hash of the name (two unknown names can share a colour).
    """
    from .registry import MODES

    out = {}
    for arm in arms:
        head, _, tail = str(arm).partition(":")
        direction, _, layers = tail.partition("@")
        entry = MODES.get(head) if tail else None
        if arm in ARM_COLORS:
            out[arm] = ARM_COLORS[arm]
        elif entry is not None and direction == "random":
            out[arm] = RANDOM_COLOR
        elif entry is not None and entry.meta.get("color") and not layers:
            out[arm] = entry.meta["color"]
        else:
            h = int.from_bytes(hashlib.sha256(str(arm).encode()).digest()[:4], "big")
            out[arm] = _EXTRA_PALETTE[h % len(_EXTRA_PALETTE)]
    return out


def arm_order(arms: Iterable[str]) -> list[str]:
    """The legend order: ``none``, then ``<mode>:v_rev`` arms (``grad`` first, then the registry's order),
    their ``@<layers>`` variants, the ``random`` controls, the data control, and anything else."""
    from .registry import MODES

    modes = ["grad"] + [m for m in MODES.names() if m != "grad"]

    def key(arm: str) -> tuple:
        head, _, tail = arm.partition(":")
        direction, _, layers = tail.partition("@")
        if arm == "none":
            return (0,)
        if head in modes and direction == "v_rev":
            return (1 if not layers else 2, modes.index(head), layers)
        if head in modes and direction == "random":
            return (3, modes.index(head), layers)
        if head == "control":
            return (4, arm)
        return (5, arm)

    return sorted(dict.fromkeys(arms), key=key)


def isotropic_p99(d_model: int, q: float = 0.99) -> float:
    """The ``q`` quantile of cosine(u, x) for x uniform on the sphere in ``d_model`` dims.

    Uses ``reversion_lens.stats.isotropic_quantile`` when it exists, else the exact Beta form
    ``(1 + c) / 2 ~ Beta((d-1)/2, (d-1)/2)``.
    """
    if int(d_model) < 2:
        raise ReversionLensError(f"d_model must be an integer >= 2, got {d_model!r}; pass the residual width.")
    try:
        from .stats import isotropic_quantile
    except ImportError:
        a = (int(d_model) - 1) / 2
        return float(2 * _sps.beta.ppf(q, a, a) - 1)
    return float(isotropic_quantile(q, int(d_model)))


# --- validation and ordering -------------------------------------------------------------------


def _check(df: pd.DataFrame, required: Sequence[str], what: str, fn: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ResultsFormatError(f"{fn} expects {what} as a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ResultsFormatError(
            f"{fn} expects {what}, with columns {list(required)}; missing {missing} "
            f"(found {list(df.columns)}). Pass that table as written by the experiment runner."
        )
    if len(df) == 0:
        raise ResultsFormatError(f"{fn} got an empty table: {what} has no rows. Check the results folder.")
    return df


def _check_fraction(df: pd.DataFrame, col: str, fn: str) -> None:
    v = df[col].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v.min() < 0 or v.max() > 1):
        raise ResultsFormatError(
            f"{fn}: column {col!r} must hold fractions in [0, 1], found values in [{v.min():g}, {v.max():g}]. "
            "If these are percentages, divide by 100."
        )


def _arms(df: pd.DataFrame, arms: Sequence[str] | None, fn: str) -> list[str]:
    present = list(dict.fromkeys(df["arm"].astype(str)))
    if arms is None:
        return arm_order(present)
    absent = [a for a in arms if a not in present]
    if absent:
        raise ResultsFormatError(f"{fn}: arms {absent} are not in the table (it has {present}); pick from those.")
    return list(arms)


def _at_layer(df: pd.DataFrame, layer: int, fn: str) -> pd.DataFrame:
    sub = df[df["layer"] == layer]
    if sub.empty:
        raise SiteError(f"{fn}: layer {layer} is not in the table; it has layers {sorted(df['layer'].unique())}.")
    return sub


def _std(x: pd.Series) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _jitter(n: int, width: float = 0.5) -> np.ndarray:
    """Evenly spread, deterministic offsets for ``n`` points around 0."""
    return np.zeros(1) if n == 1 else np.linspace(-width / 2, width / 2, n)


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# --- trajectories ------------------------------------------------------------------------------


HEATMAP_COLUMNS = 3


def alignment_heatmap(traj: pd.DataFrame, arms: Sequence[str] | None = None, zmax: float = 1.0) -> go.Figure:
    """Mean cosine(drift, v_rev) over seeds, layer (y) by step (x), one panel per arm.

    Steps where ``cos`` is NaN for every row (step 0, before any drift) are left out. The colour
    scale is diverging, centred on 0 and symmetric (``-zmax..zmax``), shared by all panels.
    """
    fn = "alignment_heatmap"
    traj = _check(traj, ["seed", "arm", "step", "layer", "cos"], TRAJ, fn)
    arms = _arms(traj, arms, fn)
    data = traj[traj["cos"].notna() & traj["arm"].isin(arms)]
    if data.empty:
        raise ResultsFormatError(f"{fn}: every 'cos' value is NaN for arms {arms}; nothing to plot.")
    steps, layers = sorted(data["step"].unique()), sorted(data["layer"].unique())
    agg = data.groupby(["arm", "layer", "step"])["cos"].agg(["mean", "std", "count"])
    ncols = min(len(arms), HEATMAP_COLUMNS)  # wrap: more than 3 narrow panels make unreadable cells
    nrows = -(-len(arms) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, shared_yaxes=True, subplot_titles=arms, horizontal_spacing=0.04,
                        vertical_spacing=min(0.3, 0.9 / nrows) if nrows > 1 else 0.1)  # fmt: skip
    show_text = len(steps) * len(layers) <= 60
    for i, arm in enumerate(arms):
        row, col = divmod(i, ncols)
        a = agg.reindex(pd.MultiIndex.from_product([[arm], layers, steps]))
        z = a["mean"].to_numpy().reshape(len(layers), len(steps))
        sd = a["std"].fillna(0.0).to_numpy().reshape(len(layers), len(steps))
        n = a["count"].fillna(0).to_numpy().reshape(len(layers), len(steps))
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[str(s) for s in steps],
                y=[str(layer) for layer in layers],
                name=arm,
                customdata=np.stack([sd, n], axis=-1),
                colorscale="RdBu_r",
                zmid=0.0,
                zmin=-zmax,
                zmax=zmax,
                showscale=i == len(arms) - 1,
                colorbar=dict(title=dict(text=COS_LABEL, side="right")),
                texttemplate="%{z:.2f}" if show_text else None,
                textfont=dict(size=10),
                hovertemplate=f"arm={arm}<br>step=%{{x}}<br>layer=%{{y}}<br>mean cos=%{{z:.3f}}"
                "<br>std=%{customdata[0]:.3f}<br>n seeds=%{customdata[1]}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
        fig.update_xaxes(title_text=STEP_LABEL, type="category", row=row + 1, col=col + 1)
    for r in range(nrows):
        fig.update_yaxes(title_text="layer", type="category", row=r + 1, col=1)
    n_seeds = data["seed"].nunique()
    fig.update_layout(
        **_LAYOUT,
        height=100 + nrows * (90 + 40 * len(layers) + 60),
        title_text=f"Drift alignment with v_rev: mean {COS_LABEL} over {n_seeds} seeds",
    )
    return fig


def alignment_curves(
    traj: pd.DataFrame, layer: int, arms: Sequence[str] | None = None, log_x: bool = False
) -> go.Figure:
    """Mean cosine(drift, v_rev) ± std across seeds over steps at one layer, one colour per arm.

    Thin faint lines are the individual seeds. Reference lines: the isotropic null p99 (mean over
    runs at this layer) and the covariance-matched null p99 as a band from min to max over runs;
    drawn only where the table has those columns.
    """
    fn = "alignment_curves"
    traj = _check(traj, ["seed", "arm", "step", "layer", "cos"], TRAJ, fn)
    arms = _arms(traj, arms, fn)
    lay = _at_layer(traj[traj["arm"].isin(arms)], layer, fn)
    data = lay[lay["cos"].notna()].sort_values("step")
    colors = arm_colors(arms)
    fig = go.Figure()
    for arm in arms:
        d, c = data[data["arm"] == arm], colors[arm]
        g = d.groupby("step")["cos"]
        mean, sd = g.mean(), g.std(ddof=1).fillna(0.0)
        x = list(mean.index)
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=list(mean + sd) + list((mean - sd)[::-1]),
                fill="toself",
                fillcolor=_rgba(c, 0.15),
                mode="lines",
                line=dict(width=0),
                name=f"{arm} ± std",
                legendgroup=arm,
                showlegend=False,
                hoverinfo="skip",
            )
        )
        for seed, s in d.groupby("seed"):
            fig.add_trace(
                go.Scatter(
                    x=s["step"],
                    y=s["cos"],
                    mode="lines",
                    line=dict(color=c, width=1),
                    opacity=0.35,
                    name=f"{arm} seed {seed}",
                    legendgroup=arm,
                    showlegend=False,
                    hovertemplate=f"arm={arm}<br>seed={seed}<br>step=%{{x}}<br>layer={layer}"
                    "<br>cos=%{y:.3f}<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                customdata=np.stack([sd, g.count()], axis=-1),
                mode="lines+markers",
                line=dict(color=c, width=2.5),
                name=arm,
                legendgroup=arm,
                hovertemplate=f"arm={arm}<br>step=%{{x}}<br>layer={layer}<br>mean cos=%{{y:.3f}}"
                "<br>std=%{customdata[0]:.3f}<br>n seeds=%{customdata[1]}<extra></extra>",
            )
        )
    span = [data["step"].min(), data["step"].max()] if len(data) else [0, 1]
    if "null_p99_matched" in lay and lay["null_p99_matched"].notna().any():
        lo, hi = lay["null_p99_matched"].min(), lay["null_p99_matched"].max()
        fig.add_trace(
            go.Scatter(
                x=span + span[::-1],
                y=[hi, hi, lo, lo],
                fill="toself",
                fillcolor="rgba(60,60,60,0.12)",
                line=dict(color="rgba(60,60,60,0.6)", width=1, dash="dot"),
                mode="lines",
                name="covariance-matched null p99 (min–max over runs)",
                hovertemplate=f"matched null p99: {lo:.3f} to {hi:.3f}<extra></extra>",
            )
        )
    if "null_p99_isotropic" in lay and lay["null_p99_isotropic"].notna().any():
        iso = float(lay["null_p99_isotropic"].mean())
        fig.add_trace(
            go.Scatter(
                x=span,
                y=[iso, iso],
                mode="lines",
                line=dict(color="black", width=1.5, dash="dash"),
                name="isotropic null p99 (mean over runs)",
                hovertemplate=f"isotropic null p99 = {iso:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line=dict(color="grey", width=1))
    fig.update_xaxes(title_text=STEP_LABEL, type="log" if log_x else "linear")
    fig.update_yaxes(title_text=COS_LABEL)
    fig.update_layout(
        **_LAYOUT,
        height=540,
        title_text=f"Drift alignment with v_rev at layer {layer} (mean ± std across seeds)",
        legend=dict(groupclick="togglegroup", orientation="h", yanchor="top", y=-0.2, x=0),
    )
    return fig


def null_comparison(
    observed: pd.DataFrame | Sequence[float] | np.ndarray,
    d_model: int | None = None,
    null_samples: Sequence[float] | np.ndarray | None = None,
    threshold: float | None = None,
    label: str | None = None,
    q: float = 0.99,
) -> go.Figure:
    """Observed cosines against a null distribution, with the count above the null's p99 in the title.

    Args:
        observed: cosines, or a trajectories slice with ``cos`` (and ``seed, arm, step`` for hover;
            one layer); NaN values (step 0) are dropped.
        d_model: draw the exact isotropic density ``f(c) ∝ (1 - c²)^((d-3)/2)`` and use its quantile.
        null_samples: otherwise, draw a histogram of these null cosines and use their quantile.
        threshold: override the line (e.g. a covariance-matched p99 computed elsewhere).
        label: the null's name in the title; default "isotropic" with ``d_model``, else "null".
        q: the quantile of the line (0.99 gives "p99").
    """
    fn = "null_comparison"
    if isinstance(observed, pd.DataFrame):
        obs = _check(observed, ["cos"], "a table with a 'cos' column (a trajectories slice)", fn)
        if "layer" in obs and obs["layer"].nunique() > 1:
            raise ResultsFormatError(f"{fn}: observed has layers {sorted(obs['layer'].unique())}; select one layer.")
        obs = obs[obs["cos"].notna()]
    else:
        obs = pd.DataFrame({"cos": np.asarray(observed, dtype=float).ravel()})
        obs = obs[obs["cos"].notna()]
    if obs.empty:
        raise ResultsFormatError(f"{fn}: no finite observed values to compare; pass run-step cosines.")
    if d_model is None and null_samples is None:
        raise ReversionLensError(f"{fn}: pass d_model (exact isotropic null) or null_samples (empirical null).")
    pname = f"p{100 * q:g}"
    label = label or ("isotropic" if d_model is not None else "null")
    x_obs = obs["cos"].to_numpy(dtype=float)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.04)
    if d_model is not None:
        sigma = 1 / np.sqrt(d_model)
        lo = min(-6 * sigma, x_obs.min() - 0.05)
        hi = max(6 * sigma, x_obs.max() + 0.05)
        grid = np.unique(np.concatenate([np.linspace(max(lo, -1), min(hi, 1), 1200), np.linspace(-6, 6, 400) * sigma]))
        grid = grid[(grid > -1) & (grid < 1)]
        a = (d_model - 1) / 2
        dens = _sps.beta.pdf((1 + grid) / 2, a, a) / 2  # density of c = 2B - 1
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=dens,
                mode="lines",
                fill="tozeroy",
                line=dict(color="#555555"),
                name=f"isotropic null density (d = {d_model})",
            ),
            row=1,
            col=1,
        )
        p = isotropic_p99(d_model, q)
        ymax = float(dens.max())
    else:
        ns = np.asarray(null_samples, dtype=float).ravel()
        ns = ns[np.isfinite(ns)]
        if ns.size == 0:
            raise ReversionLensError(f"{fn}: null_samples has no finite values; pass the null cosines.")
        counts, edges = np.histogram(ns, bins=min(80, max(10, ns.size // 20)), density=True)
        fig.add_trace(
            go.Bar(
                x=(edges[:-1] + edges[1:]) / 2,
                y=counts,
                width=np.diff(edges),
                marker_color="#888888",
                name=f"{label} null samples (n = {ns.size})",
            ),
            row=1,
            col=1,
        )
        p = float(np.quantile(ns, q))
        ymax = float(counts.max())
    if threshold is not None:
        p = float(threshold)
    above = int((x_obs > p).sum())
    line = dict(color="black", width=2, dash="dash")
    fig.add_trace(
        go.Scatter(
            x=[p, p],
            y=[0, ymax * 1.05],
            mode="lines",
            line=line,
            name=f"{label} {pname} ({p:.3f})",
            legendgroup="p",
            hoverinfo="skip",
        ),
        row=1,
        col=1,
    )
    groups = list(obs.groupby("arm", sort=False)) if "arm" in obs else [("observed", obs)]
    names = [str(g) for g, _ in groups]
    colors = arm_colors(names) if "arm" in obs else {"observed": "#333333"}
    for name, g in groups:
        name = str(name)
        hover = "cos=%{x:.3f}<extra></extra>"
        custom = None
        if {"seed", "step"} <= set(g.columns):
            custom = g[["seed", "step"]].to_numpy()
            hover = f"arm={name}<br>seed=%{{customdata[0]}}<br>step=%{{customdata[1]}}<br>" + hover
        fig.add_trace(
            go.Scatter(
                x=g["cos"],
                y=[name] * len(g),
                mode="markers",
                customdata=custom,
                hovertemplate=hover,
                name=name,
                marker=dict(symbol="line-ns-open", size=16, color=colors[name], line=dict(width=2, color=colors[name])),
            ),
            row=2,
            col=1,
        )
    fig.add_vline(x=p, line=line, row=2, col=1)
    fig.update_xaxes(title_text=COS_LABEL, row=2, col=1)
    fig.update_yaxes(title_text="density", row=1, col=1)
    fig.update_yaxes(type="category", row=2, col=1)
    fig.update_layout(
        **_LAYOUT,
        height=480,
        title_text=f"{above} of {len(x_obs)} run-step values above the {label} {pname} ({p:.3f})",
    )
    return fig


def harm_vs_alignment(traj: pd.DataFrame, layer: int) -> go.Figure:
    """Harmful-response rate against cosine(drift, v_rev) at one layer, over runs and evaluated steps.

    The title gives Spearman's rho (``scipy.stats.spearmanr``) over all plotted points.
    """
    fn = "harm_vs_alignment"
    traj = _check(traj, ["seed", "arm", "step", "layer", "cos", "harmful_rate"], TRAJ, fn)
    _check_fraction(traj, "harmful_rate", fn)
    lay = _at_layer(traj, layer, fn)
    data = lay[lay["harmful_rate"].notna() & lay["cos"].notna()]
    if len(data) < 3:
        raise ResultsFormatError(
            f"{fn}: only {len(data)} rows at layer {layer} have both cos and harmful_rate; "
            "evaluate harmfulness at more tracked steps."
        )
    constant = data["cos"].nunique() < 2 or data["harmful_rate"].nunique() < 2
    rho, pval = (np.nan, np.nan) if constant else _sps.spearmanr(data["cos"], data["harmful_rate"])
    if np.isnan(rho):
        corr = "Spearman ρ undefined (constant values)"
    else:
        corr = f"Spearman ρ = {rho:.3f} ({f'p = {pval:.2g}' if pval >= 1e-4 else 'p < 1e-4'}, n = {len(data)})"
    arms = _arms(data, None, fn)
    colors = arm_colors(arms)
    fig = go.Figure()
    for arm in arms:
        d = data[data["arm"] == arm]
        fig.add_trace(
            go.Scatter(
                x=d["cos"],
                y=100 * d["harmful_rate"],
                mode="markers",
                name=arm,
                customdata=d[["seed", "step"]].to_numpy(),
                marker=dict(color=colors[arm], size=9, opacity=0.8, line=dict(width=0.5, color="white")),
                hovertemplate=f"arm={arm}<br>seed=%{{customdata[0]}}<br>step=%{{customdata[1]}}"
                "<br>cos=%{x:.3f}<br>harmful=%{y:.1f}%<extra></extra>",
            )
        )
    fig.update_xaxes(title_text=COS_LABEL)
    fig.update_yaxes(title_text=HARM_LABEL, rangemode="tozero")
    fig.update_layout(**_LAYOUT, height=480, title_text=f"Harmfulness vs alignment at layer {layer}: {corr}")
    return fig


# --- ablations ---------------------------------------------------------------------------------


def _bars_with_points(fig, groups, col: str, scale: float, panel: int, showlegend: bool, key: str) -> None:
    """In subplot ``(1, panel)``: per group a mean bar ± std and its seeds as jittered points.

    ``groups`` is a list of ``(name, colour, rows)``; x is the group index, labelled by name.
    """
    for i, (name, color, g) in enumerate(groups):
        g = g[g[col].notna()]
        v, sd = scale * g[col].astype(float), _std(scale * g[col].astype(float))
        fig.add_trace(
            go.Bar(
                x=[i],
                y=[v.mean()],
                error_y=dict(type="data", array=[sd], color="#333333"),
                width=0.7,
                marker=dict(color=_rgba(color, 0.55), line=dict(color=color, width=1.5)),
                name=name,
                legendgroup=name,
                showlegend=showlegend,
                hovertemplate=f"{key}={name}<br>mean=%{{y:.3f}}<br>std={sd:.3f}<br>n={len(v)}<extra></extra>",
            ),
            row=1,
            col=panel,
        )
        fig.add_trace(
            go.Scatter(
                x=i + _jitter(len(v), 0.4),
                y=v,
                mode="markers",
                customdata=g["seed"].to_numpy(),
                name=f"{name} seeds",
                legendgroup=name,
                showlegend=False,
                marker=dict(color=color, size=7, line=dict(width=1, color="white")),
                hovertemplate=f"{key}={name}<br>seed=%{{customdata}}<br>value=%{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=panel,
        )
    n = len(groups)
    fig.update_xaxes(tickvals=list(range(n)), ticktext=[g[0] for g in groups], range=[-0.6, n - 0.4], row=1, col=panel)


def ablation_summary(
    runs: pd.DataFrame, arms: Sequence[str] | None = None, task: str = "auto", layer: int | None = None
) -> go.Figure:
    """Per arm: final alignment, harmful responses and task cost; mean bars ± std, seeds as points.

    ``task`` is "accuracy" (``task_accuracy``, in %), "loss" (``task_loss``) or "auto" (accuracy
    when the table has any, else loss). ``layer`` only labels the alignment panel.
    """
    fn = "ablation_summary"
    runs = _check(runs, ["seed", "arm", "final_cos", "harmful_rate"], RUNS, fn)
    if task == "auto":
        task = "accuracy" if "task_accuracy" in runs and runs["task_accuracy"].notna().any() else "loss"
    if task not in ("accuracy", "loss"):
        raise ReversionLensError(f"{fn}: task must be 'accuracy', 'loss' or 'auto', got {task!r}.")
    tcol = f"task_{task}"
    _check(runs, [tcol], RUNS, fn)
    for c in ("harmful_rate", "task_accuracy"):
        if c in runs:
            _check_fraction(runs, c, fn)
    arms = _arms(runs, arms, fn)
    if layer is None and "layer" in runs and runs["layer"].nunique() == 1:
        layer = int(runs["layer"].iloc[0])
    cos_title = f"final {COS_LABEL}" + (f", layer {layer}" if layer is not None else "")
    panels = [
        ("final_cos", 1.0, cos_title, "final alignment"),
        ("harmful_rate", 100.0, HARM_LABEL, "harmfulness"),
        (
            tcol,
            100.0 if task == "accuracy" else 1.0,
            "task accuracy (%)" if task == "accuracy" else "task loss (nats)",
            f"task {task}",
        ),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[3] for p in panels], horizontal_spacing=0.09)
    colors = arm_colors(arms)
    groups = [(a, colors[a], runs[runs["arm"] == a]) for a in arms]
    for j, (col, scale, ytitle, _) in enumerate(panels):
        _bars_with_points(fig, groups, col, scale, j + 1, j == 0, "arm")
        fig.update_yaxes(title_text=ytitle, row=1, col=j + 1)
        fig.update_xaxes(tickangle=-35, row=1, col=j + 1)
    n_seeds = runs["seed"].nunique()
    fig.update_layout(
        **_LAYOUT,
        height=460,
        barmode="overlay",
        title_text=f"Effect of each arm after fine-tuning (mean ± std over {n_seeds} seeds)",
    )
    return fig


def _blocked_order(labels: Iterable[str]) -> list[str]:
    labels = set(labels)
    layers = sorted((b for b in labels if b.lstrip("-").isdigit()), key=int)
    head = ["none"] if "none" in labels else []
    tail = [b for b in ("all", "random") if b in labels]
    rest = sorted(labels - set(head) - set(tail) - set(layers))
    return head + layers + tail + rest


def per_layer_ablation(table: pd.DataFrame) -> go.Figure:
    """Harmfulness and final alignment when blocking v_rev at one layer at a time.

    x: "none", each layer, "all", "random" (in that order); mean bars ± std and seeds as points.
    A dotted line marks the "none" mean in each panel.
    """
    fn = "per_layer_ablation"
    table = _check(table, ["seed", "blocked", "harmful_rate", "final_cos"], LAYER_ABL, fn)
    _check_fraction(table, "harmful_rate", fn)
    table = table.assign(blocked=table["blocked"].astype(str))
    order = _blocked_order(table["blocked"].unique())
    special = {"none": ARM_COLORS["none"], "all": arm_colors(["grad:v_rev"])["grad:v_rev"], "random": RANDOM_COLOR}
    groups = [(b, special.get(b, "#56B4E9"), table[table["blocked"] == b]) for b in order]
    panels = [("harmful_rate", 100.0, HARM_LABEL), ("final_cos", 1.0, f"final {COS_LABEL}")]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["harmfulness", "final alignment"], horizontal_spacing=0.1)
    for j, (col, scale, ytitle) in enumerate(panels):
        _bars_with_points(fig, groups, col, scale, j + 1, False, "blocked")
        if "none" in order:
            ref = scale * float(table.loc[table["blocked"] == "none", col].mean())
            fig.add_hline(y=ref, line=dict(color=special["none"], width=1, dash="dot"), row=1, col=j + 1)
        fig.update_yaxes(title_text=ytitle, row=1, col=j + 1)
        fig.update_xaxes(title_text="v_rev blocked at", row=1, col=j + 1)
    n_seeds = table["seed"].nunique()
    fig.update_layout(
        **_LAYOUT,
        height=440,
        barmode="overlay",
        showlegend=False,
        title_text=f"Blocking v_rev one layer at a time (mean ± std over {n_seeds} seeds)",
    )
    return fig


def _show_token(tok: str) -> str:
    return repr(str(tok).replace(" ", "␣"))[1:-1] or "''"


def vocab_readout(
    table: pd.DataFrame, layer: int, k: int | None = None, score_label: str = "score (logit units)"
) -> go.Figure:
    """Top and bottom tokens of v_rev read out through the unembedding at one layer, rank 1 on top.

    ``k`` keeps the first ``k`` ranks per side. Spaces show as ``␣`` and newlines as ``\\n``.
    """
    fn = "vocab_readout"
    table = _check(table, ["layer", "side", "rank", "token", "score"], VOCAB, fn)
    lay = _at_layer(table, layer, fn)
    sides = [s for s in ("top", "bottom") if s in set(lay["side"])]
    if not sides:
        found = sorted(set(lay["side"]))
        raise ResultsFormatError(f"{fn}: column 'side' must hold 'top' or 'bottom', found {found}; rename the values.")
    titles = [f"{s} tokens ({'+' if s == 'top' else '−'}v_rev)" for s in sides]
    fig = make_subplots(rows=1, cols=len(sides), subplot_titles=titles, horizontal_spacing=0.2)
    colors = {"top": ARM_COLORS["none"], "bottom": arm_colors(["grad:v_rev"])["grad:v_rev"]}
    n_max = 0
    for j, side in enumerate(sides):
        d = lay[lay["side"] == side].sort_values("rank")
        if k is not None:
            d = d.head(k)
        n_max = max(n_max, len(d))
        pos = list(range(len(d)))
        fig.add_trace(
            go.Bar(
                x=d["score"],
                y=pos,
                orientation="h",
                marker_color=colors[side],
                name=side,
                customdata=d[["rank"]].to_numpy(),
                text=[_show_token(t) for t in d["token"]],
                hovertemplate="token=%{text}<br>rank=%{customdata[0]}<br>score=%{x:.3f}<extra></extra>",
                textposition="none",
            ),
            row=1,
            col=j + 1,
        )
        fig.update_yaxes(
            tickvals=pos, ticktext=[_show_token(t) for t in d["token"]], autorange="reversed", row=1, col=j + 1
        )
        fig.update_xaxes(title_text=score_label, row=1, col=j + 1)
    fig.update_layout(
        **_LAYOUT, height=160 + 24 * n_max, showlegend=False, title_text=f"Vocabulary readout of v_rev at layer {layer}"
    )
    return fig
