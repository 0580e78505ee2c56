"""From a results folder to one report: ``report.html`` (summary tables and every figure) and the figure files.

:func:`build_figures` reads the tables a run wrote and calls the builders in
:mod:`reversion_lens.figures`. :func:`write_report` writes ``report.html`` beside ``summary.md`` (one
self-contained page: the summary's tables and every interactive figure, plotly.js embedded once, works
offline from disk) and each figure as ``figures/<name>.html`` (small; they share ``figures/plotly.min.js``)
and ``.png`` (when kaleido and a Chromium are there; otherwise one warning says how to get them). Used by
``reversion-lens demo``, ``analyses/make_figures.py`` and ``analyses/per_layer_ablation.py``.
"""

import html
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import figures
from .errors import ResultsFormatError
from .io import atomic_write_bytes, read_json

__all__ = ["CAPTIONS", "Report", "build_figures", "markdown_to_html", "render_report", "runs_table", "write_report"]

#: Report order, heading and caption of the known figures (from the README's figure captions, without
#: one run's numbers). Figures not listed here follow, in build order, under their file stem.
CAPTIONS: dict[str, tuple[str, str]] = {
    "alignment_curves": (
        "Drift alignment over fine-tuning",
        (
            "Mean cosine(drift, v_rev) ± std across seeds at the report layer, one colour per arm; thin lines are "
            "seeds. Dashed: the isotropic null's p99; grey band: the covariance-matched null's p99 (min–max over runs)."
        ),
    ),
    "alignment_heatmap": (
        "The same per layer",
        (
            "Mean cosine(drift, v_rev) over seeds per layer and step, one panel per arm; the colour scale is "
            "diverging around 0."
        ),
    ),
    "ablation_summary": (
        "What the block buys",
        (
            "Per arm after fine-tuning: final alignment, harmful responses and benign task cost. Bars are mean ± std "
            "over seeds, dots are seeds."
        ),
    ),
    "null_comparison": (
        "Against the null",
        (
            "The exact isotropic density of the cosine at this residual width, with every run-step value of the "
            "unblocked arm (`none`) marked; the title counts the values above its p99."
        ),
    ),
    "harm_vs_alignment": (
        "Alignment and harm",
        (
            "Harmful responses against cosine(drift, v_rev) across runs and evaluated steps, one colour per arm "
            "(Spearman ρ in the title)."
        ),
    ),
    "per_layer_ablation": (
        "Which layer matters",
        (
            "v_rev blocked at one layer at a time, at all layers, or a random direction: harmfulness and final "
            "alignment, bars mean ± std over seeds, dots seeds; the dotted line is the unblocked run."
        ),
    ),
    "vocab_readout": (
        "What v_rev says",
        "The top and bottom tokens of v_rev read out through the unembedding at the report layer (first seed).",
    ),
}


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        html: ``results/report.html``.
        figures: figure name to its files (``figures/<name>.html``, ``.png``), in report order.
        plotlyjs: the shared ``figures/plotly.min.js`` the figure HTML files load; None without HTML files.
        png_skipped: why static images were not written (with the fix), None when they were or none were asked.
    """

    html: Path
    figures: dict[str, list[Path]] = field(default_factory=dict)
    plotlyjs: Path | None = None
    png_skipped: str | None = None

    @property
    def paths(self) -> list[Path]:
        """Every file written: the report, the shared plotly.js, then each figure's files."""
        shared = [self.plotlyjs] if self.plotlyjs else []
        return [self.html, *shared, *(p for ps in self.figures.values() for p in ps)]


def runs_table(traj: pd.DataFrame, layer: int, step: int | None = None) -> pd.DataFrame:
    """One row per (seed, arm) at the last step: ``final_cos`` at ``layer`` and the final evaluations."""
    step = int(traj.step.max()) if step is None else step
    sel = traj[(traj.step == step) & (traj.layer == layer)]
    cols = ["seed", "arm", "cos", "harmful_rate", "task_accuracy", "task_loss"]
    return sel[cols].rename(columns={"cos": "final_cos"}).reset_index(drop=True)


def build_figures(results: str | os.PathLike) -> dict[str, Any]:
    """Every figure for one results folder, keyed by file stem, in report order (see :data:`CAPTIONS`)."""
    results = Path(results)
    traj_path = results / "trajectories.csv"
    if not traj_path.exists():
        raise ResultsFormatError(f"{traj_path} not found; is {results} a results folder (reversion-lens demo --out)?")
    traj = pd.read_csv(traj_path)
    summary = read_json(results / "summary.json")
    layer = int(summary["report_layer"])
    d_model = int(summary["d_model"])
    figs: dict[str, Any] = {
        "alignment_heatmap": figures.alignment_heatmap(traj),
        "alignment_curves": figures.alignment_curves(traj, layer=layer),
    }
    if traj.harmful_rate.notna().any():  # a setting (or a config) without harmful evaluation prompts has none
        figs["ablation_summary"] = figures.ablation_summary(runs_table(traj, layer))
        both = traj[(traj.layer == layer) & traj.harmful_rate.notna() & traj.cos.notna()]
        if len(both) >= 3:
            figs["harm_vs_alignment"] = figures.harm_vs_alignment(traj, layer=layer)
    obs = traj[(traj.arm == "none") & (traj.layer == layer) & traj.cos.notna() & (traj.step > 0)]
    if len(obs):
        figs["null_comparison"] = figures.null_comparison(obs, d_model=d_model, label="isotropic")
    seeds = sorted(traj.seed.unique())
    vocab = results / "runs" / f"seed{seeds[0]}" / "vocab.csv"
    if vocab.exists():
        figs["vocab_readout"] = figures.vocab_readout(pd.read_csv(vocab, keep_default_na=False), layer=layer)
    ablation = results / "per_layer.csv"
    if ablation.exists():
        figs["per_layer_ablation"] = figures.per_layer_ablation(pd.read_csv(ablation, dtype={"blocked": str}))
    order = [n for n in CAPTIONS if n in figs] + [n for n in figs if n not in CAPTIONS]
    return {n: figs[n] for n in order}


# --- markdown (the subset summary.md uses) ---------------------------------------------------------

_SEP_CELL = re.compile(r"^:?-{3,}:?$")


def _inline(text: str) -> str:
    """Escape HTML, then `code` and **bold**."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for p in parts:
        if len(p) > 1 and p.startswith("`") and p.endswith("`"):
            out.append(f"<code>{html.escape(p[1:-1], quote=False)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(p, quote=False)))
    return "".join(out)


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body.removeprefix("|")
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _table(rows: list[str]) -> str:
    head, *rest = rows
    align: list[str | None] = []
    if rest and all(_SEP_CELL.match(c) for c in _cells(rest[0])):
        for c in _cells(rest[0]):
            align.append("center" if c.startswith(":") and c.endswith(":") else "right" if c.endswith(":") else None)
        rest = rest[1:]

    def row(cells: list[str], tag: str) -> str:
        tds = []
        for i, c in enumerate(cells):
            a = align[i] if i < len(align) else None
            style = f' style="text-align:{a}"' if a else ""
            tds.append(f"<{tag}{style}>{_inline(c)}</{tag}>")
        return "<tr>" + "".join(tds) + "</tr>"

    body = "\n".join(row(_cells(r), "td") for r in rest)
    return f'<div class="table"><table>\n<thead>{row(_cells(head), "th")}</thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def markdown_to_html(text: str, heading_offset: int = 0) -> str:
    """Markdown to an HTML fragment, for the subset ``summary.md`` is written in.

    Handles ATX headings (``#`` .. ``######``), pipe tables (an optional ``| --- |`` row after the header;
    ``:---:``/``---:`` align), ``- `` lists, paragraphs, inline ```code``` and ``**bold**``. Everything
    else is kept as escaped text, so no input can inject HTML.

    Args:
        text: the markdown.
        heading_offset: added to every heading level (1 turns ``#`` into ``<h2>``), capped at 6.

    Returns:
        The HTML fragment.
    """
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
            continue
        if m := re.match(r"^(#{1,6})\s+(.*?)\s*#*$", line):
            level = min(6, len(m.group(1)) + heading_offset)
            blocks.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
        elif re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i]).strip()) + "</li>")
                i += 1
            blocks.append("<ul>\n" + "\n".join(items) + "\n</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,6}\s|\s*\||\s*[-*]\s+)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            blocks.append("<p>" + _inline(" ".join(para)) + "</p>")
    return "\n".join(blocks)


# --- the page --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0; }
main { max-width: 960px; margin: 0 auto; padding: 24px 20px 60px; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.35em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
.meta, .files, .note { color: #555; font-size: 0.9em; }
.note { background: #fff6e0; border-left: 3px solid #E69F00; padding: 6px 10px; }
nav ol { columns: 2; font-size: 0.95em; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; font-size: 0.92em; }
.table { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 0 0 2.2em; }
figcaption { margin: 0.3em 0 0.6em; }
.plot { overflow-x: auto; }
"""


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def render_report(
    figs: dict[str, Any],
    summary_md: str | None,
    title: str,
    base: Path | None = None,
    files: dict[str, list[Path]] | None = None,
    note: str | None = None,
) -> str:
    """The report page as one HTML string: title, summary tables, then every figure with its caption.

    Args:
        figs: name to ``go.Figure``, in the order shown.
        summary_md: the summary's markdown, or None; shown under "Summary" without its ``#`` title, its
            ``##`` headings as ``<h3>``.
        title: the page's ``<h1>`` and ``<title>``.
        base: the folder the page is written to, for relative links to ``files``.
        files: name to the figure's own files, linked under each figure.
        note: a line shown above the figures (e.g. why there are no PNGs).

    Returns:
        A complete HTML document with plotly.js embedded once; it needs no network.
    """
    from .export import plotlyjs_source

    toc = ['<li><a href="#summary">Summary</a></li>'] if summary_md else []
    sections = []
    for k, (name, fig) in enumerate(figs.items(), start=1):
        heading, caption = CAPTIONS.get(name, (name.replace("_", " "), ""))
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"fig-{name}",
            config={"toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}},
        )
        links = ""
        if files and files.get(name) and base is not None:
            links = (
                '<p class="files">files: '
                + " · ".join(
                    f'<a href="{html.escape(_rel(p, base))}">{html.escape(p.suffix.lstrip("."))}</a>'
                    for p in files[name]
                )
                + "</p>"
            )
        toc.append(f'<li><a href="#{html.escape(name)}">{html.escape(heading)}</a></li>')
        sections.append(
            f'<figure id="{html.escape(name)}">\n<h3>Figure {k}. {html.escape(heading)}</h3>\n'
            f'<figcaption>{_inline(caption)}</figcaption>\n<div class="plot">{div}</div>\n{links}\n</figure>'
        )
    summary = (
        f'<section id="summary">\n<h2>Summary</h2>\n{markdown_to_html(_drop_title(summary_md), heading_offset=1)}\n</section>'
        if summary_md
        else '<p class="note">No summary.md in this results folder: figures only.</p>'
    )
    note_html = f'<p class="note">{_inline(note)}</p>' if note else ""
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>",
            f'<script type="text/javascript">{plotlyjs_source()}</script>',
            "</head>",
            "<body><main>",
            f"<h1>{html.escape(title)}</h1>",
            f"<nav><ol>{''.join(toc)}</ol></nav>",
            summary,
            '<section id="figures">',
            "<h2>Figures</h2>",
            note_html,
            "\n".join(sections),
            "</section>",
            "</main></body>",
            "</html>",
            "",
        ]
    )


def _drop_title(md: str) -> str:
    """summary.md without its leading ``# `` title (the page has its own)."""
    lines = md.splitlines()
    first = next((k for k, line in enumerate(lines) if line.strip()), None)
    if first is not None and re.match(r"^#\s", lines[first]):
        del lines[first]
    return "\n".join(lines)


def _title(summary_md: str | None, results: Path) -> str:
    m = re.search(r"^#\s+(.*?)\s*$", summary_md or "", flags=re.MULTILINE)
    head = m.group(1).removesuffix(": summary") if m else "Fine-tuning reversion"
    return f"{head} report: {results.resolve().name}"


def write_report(
    results: str | os.PathLike,
    out: str | os.PathLike | None = None,
    formats: tuple[str, ...] = ("html", "png"),
) -> Report:
    """Write ``results/report.html`` and each figure's files into ``out`` (default ``results/figures``).

    Args:
        results: a results folder (``trajectories.csv``, ``summary.json``, ``summary.md``; optionally
            ``per_layer.csv`` and ``runs/seed<s>/vocab.csv``).
        out: where the individual figure files go.
        formats: the individual files per figure: "html" (small files sharing ``out/plotly.min.js``) and/or
            "png" (or another :data:`reversion_lens.export.STATIC_FORMATS`); ``()`` writes only report.html.

    Returns:
        A :class:`Report` listing every path written. When static images were asked for but kaleido or a
        Chromium is missing, they are skipped, ``png_skipped`` says why and how to get them, the report
        page says so too, and one :class:`~reversion_lens.export.PngUnavailableWarning` is issued for the
        whole report.
    """
    from .export import PLOTLYJS_FILE, PngUnavailableWarning, write_figures_quietly

    results = Path(results)
    out = Path(out) if out is not None else results / "figures"
    figs = build_figures(results)
    written, skipped = write_figures_quietly(figs, out, formats=formats) if formats else ({}, None)
    plotlyjs = written.pop(PLOTLYJS_FILE, [None])[0]
    md_path = results / "summary.md"
    summary_md = md_path.read_text(encoding="utf-8") if md_path.exists() else None
    page = render_report(
        figs,
        summary_md,
        _title(summary_md, results),
        base=results,
        files=written,
        note=f"PNG files were not written. {skipped}" if skipped else None,
    )
    report = Report(atomic_write_bytes(results / "report.html", page.encode("utf-8")), written, plotlyjs, skipped)
    if skipped:
        warnings.warn(f"{report.html} written; {skipped}", PngUnavailableWarning, stacklevel=2)
    return report
