"""Write figures to disk: HTML always, PNG (or SVG/PDF) when a browser is available.

HTML figures load one shared ``plotly.min.js`` written beside them (``plotlyjs="directory"``), so each
file is small and the folder opens offline from disk; ``plotlyjs="inline"`` embeds it in every file.

Static images are rendered by kaleido (>= 1), which drives a headless Chromium/Chrome. All images
of one :func:`write_figures` call share one browser session (``kaleido.start_sync_server``), so
the browser starts once, not once per figure. Without a browser the HTML is still written and
one :class:`PngUnavailableWarning` says how to get the images.

Every file is written atomically (:func:`reversion_lens.io.atomic_write_bytes`).
"""

import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go

from .errors import ReversionLensError
from .io import atomic_write_bytes

__all__ = [
    "PLOTLYJS_FILE",
    "PLOTLYJS_MARKER",
    "STATIC_FORMATS",
    "PngUnavailableWarning",
    "plotlyjs_source",
    "png_available",
    "write_figures",
    "write_figures_quietly",
    "write_plotlyjs",
]

#: Formats rendered through kaleido; "html" is written by plotly itself.
STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
#: Ways an HTML figure gets plotly.js (see :func:`write_figures`).
PLOTLYJS_MODES = ("directory", "inline", "cdn")

_FIX = (
    "To get PNGs, install a Chromium-based browser (Debian/Ubuntu: `apt-get install chromium`; "
    "or `plotly_get_chrome`) or point BROWSER_PATH at one, and `pip install 'kaleido>=1'`."
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PngUnavailableWarning(UserWarning):
    """Static images were skipped: kaleido or a working Chromium-based browser is missing."""


class _BrowserDied(RuntimeError):
    pass


def _find_browser() -> str | None:
    try:  # the same search kaleido's browser launcher does (BROWSER_PATH, PATH, its own download)
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:
        names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
        return os.environ.get("BROWSER_PATH") or next((p for n in names if (p := shutil.which(n))), None)


def png_available() -> tuple[bool, str]:
    """Whether static images can be rendered here: ``(ok, reason)``; the reason says the fix when not ok."""
    try:
        from importlib.metadata import version

        import kaleido  # noqa: F401
    except ImportError:
        return False, f"kaleido is not installed. {_FIX}"
    major = int(version("kaleido").split(".")[0])
    if major < 1:
        return False, f"kaleido {version('kaleido')} is too old (plotly needs kaleido >= 1). {_FIX}"
    path = _find_browser()
    if not path:
        return False, f"no Chromium or Chrome browser was found. {_FIX}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        src = "BROWSER_PATH" if os.environ.get("BROWSER_PATH") == path else "the browser search"
        return False, f"{src} gives {path!r}, which is not an executable file. {_FIX}"
    return True, f"kaleido {version('kaleido')} with browser {path}"


#: kaleido 1.5 now and then binds a tab to a JavaScript context where its scripts are not loaded (seen in 3
#: of ~25 test runs on a busy 2-core machine, once with another kaleido process rendering); every figure then
#: fails with this error. A fresh server (new tabs) renders normally, so :func:`write_figures` restarts the
#: server it started and retries that image once.
_PAGE_RACE = "kaleido_scopes is not defined"


def _start_server() -> None:
    import kaleido
    import plotly.io as pio

    # mathjax off: no network fetch, no LaTeX used
    kaleido.start_sync_server(mathjax=False, headers=pio.defaults.headers, silence_warnings=True)


def _render(fig: go.Figure, fmt: str, scale: float) -> bytes:
    """``fig.to_image`` through the shared kaleido server, failing instead of hanging if it died.

    kaleido 1.5's sync server runs the browser in a thread; if the browser fails to start, that
    thread ends and a plain ``to_image`` would wait forever. We wait in steps and check it.
    """
    import kaleido

    server = getattr(kaleido, "_global_server", None)
    result: dict = {}

    def work() -> None:
        try:
            with warnings.catch_warnings():  # plotly passes its default kopts, which a running server ignores
                warnings.filterwarnings("ignore", "The kopts argument is ignored", UserWarning)
                result["bytes"] = fig.to_image(format=fmt, scale=scale)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
        thread = getattr(server, "_thread", None)
        if t.is_alive() and thread is not None and not thread.is_alive():
            raise _BrowserDied(f"the browser ({_find_browser()}) stopped or failed to start. {_FIX}")
    if "error" in result:
        raise result["error"]
    return result["bytes"]


#: The file that ``plotlyjs="directory"`` writes beside the HTML figures, which load it by a relative path.
PLOTLYJS_FILE = "plotly.min.js"
#: A string that occurs once per copy of plotly.js (its licence banner): count it to check a page embeds it once.
PLOTLYJS_MARKER = "* plotly.js v"


def plotlyjs_source() -> str:
    """The plotly.js bundle that ships with the installed ``plotly`` (about 4.8 MB), read from disk, no network."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def write_plotlyjs(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/plotly.min.js`` unless an identical copy is already there; returns its path."""
    path = Path(out_dir) / PLOTLYJS_FILE
    data = plotlyjs_source().encode("utf-8")
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    return atomic_write_bytes(path, data)


def write_figures(
    figures: Mapping[str, go.Figure],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("html", "png"),
    scale: float = 2,
    plotlyjs: str = "directory",
) -> dict[str, list[Path]]:
    """Write each figure as ``out_dir/<name>.<fmt>``; returns ``{name: [paths written]}``.

    Args:
        figures: name (a file stem: letters, digits, ``.``, ``_``, ``-``) to figure.
        out_dir: created if missing.
        formats: any of "html" and :data:`STATIC_FORMATS`.
        scale: pixel multiplier of static images (2 gives a 1800-px-wide PNG for a 900-px figure).
        plotlyjs: how the HTML files get plotly.js. "directory" (default): written once as
            ``out_dir/plotly.min.js`` (:data:`PLOTLYJS_FILE`, also the key it is listed under in the
            result) and loaded by a relative path, so each file is ~10-100 kB and the folder works offline,
            opened from disk (move the folder, not a single file). "inline": embedded in every file
            (self-contained, ~4.8 MB each). "cdn": linked from the plotly CDN (needs the internet to open).

    Without a browser for static images, or when it fails to start, the HTML is still written, the
    images are skipped and one :class:`PngUnavailableWarning` says how to get them. A figure that
    kaleido cannot render raises.
    """
    written, skipped = write_figures_quietly(figures, out_dir, formats, scale, plotlyjs)
    if skipped:
        warnings.warn(skipped, PngUnavailableWarning, stacklevel=2)
    return written


def write_figures_quietly(
    figures: Mapping[str, go.Figure],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("html", "png"),
    scale: float = 2,
    plotlyjs: str = "directory",
) -> tuple[dict[str, list[Path]], str | None]:
    """:func:`write_figures` without the warning: returns ``(written, why images were skipped or None)``.

    For callers that report the skip their own way (one line for a whole report).
    """
    formats = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    bad = [f for f in formats if f != "html" and f not in STATIC_FORMATS]
    if bad:
        raise ReversionLensError(f"unknown figure formats {bad}; use 'html' and/or {list(STATIC_FORMATS)}.")
    if plotlyjs not in PLOTLYJS_MODES:
        raise ReversionLensError(f"plotlyjs must be one of {list(PLOTLYJS_MODES)}, got {plotlyjs!r}.")
    for name, fig in figures.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ReversionLensError(
                f"figure name {name!r} is not a plain file stem; use letters, digits, '.', '_', '-'."
            )
        if not isinstance(fig, go.Figure):
            raise ReversionLensError(f"figure {name!r} is a {type(fig).__name__}, not a plotly go.Figure.")
    if PLOTLYJS_FILE in figures:
        raise ReversionLensError(f"{PLOTLYJS_FILE!r} is reserved for the shared plotly.js file; rename that figure.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {name: [] for name in figures}

    if "html" in formats and figures:
        if plotlyjs == "directory":
            written[PLOTLYJS_FILE] = [write_plotlyjs(out)]
        include = {"inline": True, "cdn": "cdn", "directory": "directory"}[plotlyjs]
        for name, fig in figures.items():
            html = fig.to_html(
                include_plotlyjs=include,
                full_html=True,
                config={"toImageButtonOptions": {"format": "png", "filename": name, "scale": scale}},
            )
            written[name].append(atomic_write_bytes(out / f"{name}.html", html.encode("utf-8")))

    static = [f for f in formats if f in STATIC_FORMATS]
    if not (static and figures):
        return written, None
    ok, reason = png_available()
    if not ok:
        return written, f"Skipped {', '.join(static)} for {len(figures)} figures: {reason}"
    import kaleido

    server = getattr(kaleido, "_global_server", None)
    already = bool(server is not None and server.is_running())
    if not already:  # one browser for every image
        _start_server()
    try:
        for name, fig in figures.items():
            for fmt in static:
                try:
                    data = _render(fig, fmt, scale)
                except Exception as e:  # only kaleido's page-load race is retried
                    if already or _PAGE_RACE not in str(e):
                        raise
                    kaleido.stop_sync_server(silence_warnings=True)  # fresh tabs, then once more
                    _start_server()
                    data = _render(fig, fmt, scale)
                written[name].append(atomic_write_bytes(out / f"{name}.{fmt}", data))
    except _BrowserDied as e:
        return written, f"Skipped {', '.join(static)} from figure {name!r} on: {e}"
    finally:
        if not already:
            kaleido.stop_sync_server(silence_warnings=True)
    return written, None
