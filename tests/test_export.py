"""Writing figures to disk: light HTML sharing one plotly.min.js, PNG through kaleido when a browser is there."""

import warnings

import plotly.graph_objects as go
import pytest
from test_figures import make_traj, make_vocab

from reversion_lens import export, figures
from reversion_lens.errors import ReversionLensError
from reversion_lens.export import PLOTLYJS_MARKER

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_figures() -> dict[str, go.Figure]:
    return {"heat": figures.alignment_heatmap(make_traj()), "vocab": figures.vocab_readout(make_vocab(), layer=0)}


def test_directory_mode_writes_plotlyjs_once_and_small_files(tmp_path):
    out = export.write_figures(two_figures(), tmp_path / "figs", formats=("html",))
    js = tmp_path / "figs" / export.PLOTLYJS_FILE
    assert out == {"heat": [tmp_path / "figs" / "heat.html"], "vocab": [tmp_path / "figs" / "vocab.html"],
                   export.PLOTLYJS_FILE: [js]}  # fmt: skip
    assert js.read_text(encoding="utf-8") == export.plotlyjs_source()
    assert js.read_text(encoding="utf-8").count(PLOTLYJS_MARKER) == 1
    for name in ("heat", "vocab"):
        html = (tmp_path / "figs" / f"{name}.html").read_text(encoding="utf-8")
        assert len(html.encode()) < 100_000
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in html  # relative: works from disk
        assert PLOTLYJS_MARKER not in html and "cdn.plot.ly" not in html and "Plotly.newPlot(" in html
    # a second call keeps the identical shared file as it is
    stamp = js.stat().st_mtime_ns
    export.write_figures(two_figures(), tmp_path / "figs", formats=("html",))
    assert js.stat().st_mtime_ns == stamp


def test_inline_and_cdn_modes(tmp_path):
    fig = {"v": figures.vocab_readout(make_vocab(), 0)}
    inline = export.write_figures(fig, tmp_path / "inline", formats=("html",), plotlyjs="inline")
    html = inline["v"][0].read_text(encoding="utf-8")
    assert list(inline) == ["v"] and html.count(PLOTLYJS_MARKER) == 1 and "src=" not in html.split("<body>")[0]
    cdn = export.write_figures(fig, tmp_path / "cdn", formats=("html",), plotlyjs="cdn")
    assert 'src="https://cdn.plot.ly' in cdn["v"][0].read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "cdn").iterdir()) == ["v.html"]
    with pytest.raises(ReversionLensError, match="plotlyjs must be one of"):
        export.write_figures(fig, tmp_path, plotlyjs="local")
    with pytest.raises(ReversionLensError, match="reserved"):
        export.write_figures({export.PLOTLYJS_FILE: go.Figure()}, tmp_path)


def test_write_figures_html_and_png(tmp_path):
    ok, reason = export.png_available()
    if not ok:
        pytest.skip(reason)  # the no-browser path is tested below in every environment
    with warnings.catch_warnings():
        warnings.simplefilter("error", export.PngUnavailableWarning)
        out = export.write_figures(two_figures(), tmp_path / "figs")
    assert {k: [p.name for p in v] for k, v in out.items()} == {
        "heat": ["heat.html", "heat.png"],
        "vocab": ["vocab.html", "vocab.png"],
        "plotly.min.js": ["plotly.min.js"],
    }
    for name in ("heat", "vocab"):
        png = out[name][1].read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 1024
        assert int.from_bytes(png[16:20], "big") == 2 * figures.WIDTH  # scale=2
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "heat.html", "heat.png", "plotly.min.js", "vocab.html", "vocab.png"]  # fmt: skip


def test_write_figures_without_browser(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "png_available", lambda: (False, "no Chromium or Chrome browser was found. fix"))
    with pytest.warns(export.PngUnavailableWarning, match="Skipped png for 1 figures: no Chromium") as rec:
        out = export.write_figures({"v": figures.vocab_readout(make_vocab(), 0)}, tmp_path, plotlyjs="cdn")
    assert len([w for w in rec if w.category is export.PngUnavailableWarning]) == 1
    assert [p.name for p in out["v"]] == ["v.html"]
    # write_figures_quietly returns the reason instead of warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written, why = export.write_figures_quietly({"v": figures.vocab_readout(make_vocab(), 0)}, tmp_path)
    assert why == "Skipped png for 1 figures: no Chromium or Chrome browser was found. fix"
    assert sorted(written) == ["plotly.min.js", "v"]
    monkeypatch.undo()
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    ok, reason = export.png_available()
    assert not ok and "BROWSER_PATH" in reason and "apt-get install chromium" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Exception, match="not a plain file stem"):
            export.write_figures({"../x": go.Figure()}, tmp_path)


def test_kaleido_page_race_restarts_the_server_once(tmp_path, monkeypatch):
    """kaleido's 'kaleido_scopes is not defined' race: restart the server, retry that image once; other errors raise."""
    kaleido = pytest.importorskip("kaleido")
    calls = {"start": 0, "stop": 0, "render": 0}
    monkeypatch.setattr(export, "png_available", lambda: (True, "fake"))
    monkeypatch.setattr(kaleido, "_global_server", None, raising=False)
    monkeypatch.setattr(kaleido, "start_sync_server", lambda **kw: calls.__setitem__("start", calls["start"] + 1))
    monkeypatch.setattr(kaleido, "stop_sync_server", lambda **kw: calls.__setitem__("stop", calls["stop"] + 1))

    def flaky(fig, fmt, scale, fail_on=(1,), message=export._PAGE_RACE):
        calls["render"] += 1
        if calls["render"] in fail_on:
            raise RuntimeError(f"JavascriptError: ReferenceError: {message}")
        return PNG_MAGIC + b"fake"

    monkeypatch.setattr(export, "_render", flaky)
    out = export.write_figures(two_figures(), tmp_path, formats=("png",))
    assert [p.read_bytes() for ps in out.values() for p in ps] == [PNG_MAGIC + b"fake"] * 2
    assert calls == {"start": 2, "stop": 2, "render": 3}  # one restart, the failed image rendered again
    monkeypatch.setattr(export, "_render", lambda *a: flaky(*a, fail_on=(4, 5)))  # fails again after the restart
    with pytest.raises(RuntimeError, match="kaleido_scopes"):
        export.write_figures(two_figures(), tmp_path / "again", formats=("png",))
    assert calls["stop"] == calls["start"] == 4  # the server it started is stopped even so
    monkeypatch.setattr(export, "_render", lambda *a: flaky(*a, fail_on=(6,), message="x is not defined"))
    with pytest.raises(RuntimeError, match="x is not defined"):  # any other error: no retry
        export.write_figures(two_figures(), tmp_path / "other", formats=("png",))
    assert calls["render"] == 6 and calls["start"] == 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_write_figures_browser_that_fails_to_start(tmp_path, monkeypatch):
    """kaleido's server thread dies when the browser does not start; we warn instead of waiting forever."""
    monkeypatch.setenv("BROWSER_PATH", "/bin/false")
    if not export.png_available()[0]:
        pytest.skip("kaleido missing")
    with pytest.warns(export.PngUnavailableWarning, match="failed to start"):
        out = export.write_figures({"v": figures.vocab_readout(make_vocab(), 0)}, tmp_path)
    assert [p.name for p in out["v"]] == ["v.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotly.min.js", "v.html"]
