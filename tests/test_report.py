"""report.html and the figure files of a results folder, built from small synthetic tables."""

import os
import re
import subprocess
import warnings

import pytest
from test_figures import D_MODEL, make_layer_ablation, make_traj, make_vocab

from reversion_lens import export
from reversion_lens.errors import ResultsFormatError
from reversion_lens.export import PLOTLYJS_MARKER, PngUnavailableWarning
from reversion_lens.io import write_json
from reversion_lens.report import CAPTIONS, build_figures, markdown_to_html, write_report

MAX_REPORT_BYTES = 6_000_000
MAX_FIGURE_HTML_BYTES = 100_000
ORDER = list(CAPTIONS)  # all seven figures exist for the synthetic folder

SUMMARY_MD = """# Fine-tuning reversion: summary

2 seeds, mean ± std across seeds; alignment = cosine(drift, v_rev) at layer 1 (`resid_post`, d_model 64).

## The paper's claims beside ours

| claim | paper | ours |
| --- | --- | --- |
| final alignment, no block | 0.65 | 0.82 ± 0.03 |
| harmfulness, `grad:v_rev` block | 8.5% | 4.1 ± 1.0% |

## Per arm at step T

| arm | final alignment | harmful |
| --- | --- | --- |
| `none` | 0.82 ± 0.03 | 61.0 ± 2.0% |
| `grad:v_rev` | 0.05 ± 0.02 | 4.1 ± 1.0% |
| `grad:random` | 0.74 ± 0.03 | 58.5 ± 2.0% |

Spearman ρ between alignment (layer 1) and harmfulness: 0.91 (p = 1e-05, n = 30).
"""
SUMMARY_ROWS = [
    "<tr><td>final alignment, no block</td><td>0.65</td><td>0.82 ± 0.03</td></tr>",
    "<tr><td>harmfulness, <code>grad:v_rev</code> block</td><td>8.5%</td><td>4.1 ± 1.0%</td></tr>",
    "<tr><td><code>none</code></td><td>0.82 ± 0.03</td><td>61.0 ± 2.0%</td></tr>",
    "<tr><td><code>grad:v_rev</code></td><td>0.05 ± 0.02</td><td>4.1 ± 1.0%</td></tr>",
    "<tr><td><code>grad:random</code></td><td>0.74 ± 0.03</td><td>58.5 ± 2.0%</td></tr>",
]


def make_results(folder, summary_md: str | None = SUMMARY_MD):
    """A results folder as the runner writes it, with the synthetic tables of test_figures."""
    folder.mkdir(parents=True, exist_ok=True)
    make_traj().to_csv(folder / "trajectories.csv", index=False)
    write_json(folder / "summary.json", {"report_layer": 1, "d_model": D_MODEL})
    if summary_md is not None:
        (folder / "summary.md").write_text(summary_md, encoding="utf-8")
    (folder / "runs" / "seed0").mkdir(parents=True)
    make_vocab().to_csv(folder / "runs" / "seed0" / "vocab.csv", index=False)
    make_layer_ablation().to_csv(folder / "per_layer.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    """write_report with HTML figure files only (no browser involved)."""
    results = make_results(tmp_path_factory.mktemp("results"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about when no PNG is asked for
        report = write_report(results, formats=("html",))
    return results, report


def test_markdown_to_html():
    md = "# Title\n\nline one\nline <two> **bold** `a<b`\n\n| a | b:c |\n| :---: | ---: |\n| `x` | 1 \\| 2 |\n\n- i\n- j\n"
    assert markdown_to_html(md, heading_offset=1) == (
        "<h2>Title</h2>\n"
        "<p>line one line &lt;two&gt; <strong>bold</strong> <code>a&lt;b</code></p>\n"
        '<div class="table"><table>\n'
        '<thead><tr><th style="text-align:center">a</th><th style="text-align:right">b:c</th></tr></thead>\n'
        "<tbody>\n"
        '<tr><td style="text-align:center"><code>x</code></td><td style="text-align:right">1 | 2</td></tr>\n'
        "</tbody>\n</table></div>\n"
        "<ul>\n<li>i</li>\n<li>j</li>\n</ul>"
    )
    assert markdown_to_html("###### deep", heading_offset=3) == "<h6>deep</h6>"
    assert markdown_to_html("<script>alert(1)</script>") == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"


def test_report_holds_tables_and_every_figure_once(html_report):
    results, report = html_report
    page = report.html.read_text(encoding="utf-8")
    assert report.html == results / "report.html"
    assert report.html.stat().st_size <= MAX_REPORT_BYTES
    assert page.count(PLOTLYJS_MARKER) == 1  # plotly.js embedded exactly once
    assert page.count("Plotly.newPlot(") == len(ORDER)
    assert not re.search(r"<script[^>]*\ssrc=", page)  # nothing loaded from anywhere: works offline from disk
    assert "cdn.plot.ly" not in page.replace(export.plotlyjs_source(), "")  # (the bundle itself names the CDN)
    ids = re.findall(r'<div id="fig-([a-z_]+)" class="plotly-graph-div"', page)
    assert ids == ORDER  # every figure, in report order
    for k, name in enumerate(ORDER, start=1):
        assert f"<h3>Figure {k}. {CAPTIONS[name][0]}</h3>" in page
        assert f'<a href="figures/{name}.html">html</a>' in page
    for row in SUMMARY_ROWS:
        assert row in page
    assert (
        "<title>Fine-tuning reversion report: " in page and page.count("<h1>") == 1
    )  # summary.md's h1 is not repeated
    assert "<h2>Summary</h2>" in page and "<h3>The paper's claims beside ours</h3>" in page
    assert "PNG files were not written" not in page


def test_figure_files_are_light_and_share_plotlyjs(html_report):
    results, report = html_report
    figs = results / "figures"
    assert list(report.figures) == ORDER
    assert report.plotlyjs == figs / "plotly.min.js"
    assert report.plotlyjs.read_text(encoding="utf-8").count(PLOTLYJS_MARKER) == 1
    for name, paths in report.figures.items():
        assert paths == [figs / f"{name}.html"]
        html = paths[0].read_text(encoding="utf-8")
        assert paths[0].stat().st_size < MAX_FIGURE_HTML_BYTES
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in html and PLOTLYJS_MARKER not in html
    on_disk = {p for p in results.rglob("*") if p.is_file()} - {p for p in results.rglob("*.csv")}
    assert set(report.paths) == on_disk - {results / "summary.json", results / "summary.md"}
    assert report.png_skipped is None


def _chromium() -> str | None:
    path = export._find_browser()
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


@pytest.mark.parametrize("page", ["report.html", "figures/alignment_curves.html"])
def test_pages_render_from_disk_without_network(html_report, page):
    """A real browser opens the file from disk, every network request refused, and draws every plot."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium to open the page with")
    results, _ = html_report
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--dump-dom",
           (results / page).as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120).stdout
    n = len(ORDER) if page == "report.html" else 1
    drawn = re.findall(r'<div id="[^"]+" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(drawn) == n, dom[:2000]  # plotly.js ran and drew each figure (it adds js-plotly-plot)
    assert dom.count('class="main-svg"') >= n


def test_report_without_browser_warns_once(tmp_path, monkeypatch):
    results = make_results(tmp_path / "results")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = write_report(results)
    assert [w.category for w in rec] == [PngUnavailableWarning]  # one line for the whole report
    msg = str(rec[0].message)
    assert f"Skipped png for {len(ORDER)} figures" in msg and "apt-get install chromium" in msg
    assert "BROWSER_PATH" in msg and str(tmp_path / "no-such-browser") in msg
    assert report.png_skipped in msg
    assert not list(results.rglob("*.png")) and all(len(p) == 1 for p in report.figures.values())
    page = report.html.read_text(encoding="utf-8")
    assert page.count("PNG files were not written.") == 1 and "apt-get install chromium" in page


def test_report_with_pngs(tmp_path):
    ok, reason = export.png_available()
    if not ok:
        pytest.skip(reason)  # the warning path is tested above in every environment
    results = make_results(tmp_path / "results")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PngUnavailableWarning)
        report = write_report(results, tmp_path / "figs")
    for name, paths in report.figures.items():
        assert [p.name for p in paths] == [f"{name}.html", f"{name}.png"]
        png = paths[1].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1800
    page = report.html.read_text(encoding="utf-8")
    assert '<a href="../figs/vocab_readout.png">png</a>' in page and report.png_skipped is None


def test_report_only_and_partial_folders(tmp_path):
    results = make_results(tmp_path / "r", summary_md=None)
    report = write_report(results, formats=())
    assert report.figures == {} and report.plotlyjs is None and not (results / "figures").exists()
    page = report.html.read_text(encoding="utf-8")
    assert "No summary.md in this results folder" in page and page.count("Plotly.newPlot(") == len(ORDER)
    (results / "trajectories.csv").unlink()
    with pytest.raises(ResultsFormatError, match="trajectories.csv not found"):
        write_report(results)
    assert list(build_figures(make_results(tmp_path / "r2"))) == ORDER
