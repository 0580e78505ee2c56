"""Write figures to disk: self-contained HTML always, PNG (or SVG/PDF) when a browser is available.

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

__all__ = ["write_figures", "png_available", "PngUnavailableWarning", "STATIC_FORMATS"]

#: Formats rendered through kaleido; "html" is written by plotly itself.
STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")

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
    except Exception:  # noqa: BLE001 - choreographer internals moved: fall back to PATH
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
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
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


def write_figures(
    figures: Mapping[str, go.Figure],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("html", "png"),
    scale: float = 2,
    plotlyjs: str = "inline",
) -> dict[str, list[Path]]:
    """Write each figure as ``out_dir/<name>.<fmt>``; returns ``{name: [paths written]}``.

    Args:
        figures: name (a file stem: letters, digits, ``.``, ``_``, ``-``) to figure.
        out_dir: created if missing.
        formats: any of "html" and :data:`STATIC_FORMATS`.
        scale: pixel multiplier of static images (2 gives a 1800-px-wide PNG for a 900-px figure).
        plotlyjs: "inline" embeds plotly.js so the HTML works offline (about 4.6 MB per file);
            "cdn" links it from the plotly CDN (small files that need the internet to open).

    Without a browser for static images, or when it fails to start, the HTML is still written, the
    images are skipped and one :class:`PngUnavailableWarning` says how to get them. A figure that
    kaleido cannot render raises.
    """
    formats = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    bad = [f for f in formats if f != "html" and f not in STATIC_FORMATS]
    if bad:
        raise ReversionLensError(f"unknown figure formats {bad}; use 'html' and/or {list(STATIC_FORMATS)}.")
    if plotlyjs not in ("inline", "cdn"):
        raise ReversionLensError(f"plotlyjs must be 'inline' or 'cdn', got {plotlyjs!r}.")
    for name, fig in figures.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ReversionLensError(
                f"figure name {name!r} is not a plain file stem; use letters, digits, '.', '_', '-'."
            )
        if not isinstance(fig, go.Figure):
            raise ReversionLensError(f"figure {name!r} is a {type(fig).__name__}, not a plotly go.Figure.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {name: [] for name in figures}

    if "html" in formats:
        for name, fig in figures.items():
            html = fig.to_html(
                include_plotlyjs=True if plotlyjs == "inline" else "cdn",
                full_html=True,
                config={"toImageButtonOptions": {"format": "png", "filename": name, "scale": scale}},
            )
            written[name].append(atomic_write_bytes(out / f"{name}.html", html.encode("utf-8")))

    static = [f for f in formats if f in STATIC_FORMATS]
    if static and figures:
        ok, reason = png_available()
        if not ok:
            warnings.warn(f"Skipped {', '.join(static)} for {len(figures)} figures: {reason}", PngUnavailableWarning,
                          stacklevel=2)
            return written
        import kaleido

        server = getattr(kaleido, "_global_server", None)
        already = bool(server is not None and server.is_running())
        if not already:  # one browser for every image; mathjax off: no network fetch, no LaTeX used
            import plotly.io as pio

            kaleido.start_sync_server(mathjax=False, headers=pio.defaults.headers, silence_warnings=True)
        try:
            for name, fig in figures.items():
                for fmt in static:
                    data = _render(fig, fmt, scale)
                    written[name].append(atomic_write_bytes(out / f"{name}.{fmt}", data))
        except _BrowserDied as e:
            msg = f"Skipped {', '.join(static)} from figure {name!r} on: {e}"
            warnings.warn(msg, PngUnavailableWarning, stacklevel=2)
        finally:
            if not already:
                kaleido.stop_sync_server(silence_warnings=True)
    return written
