"""Regenerate the report and every paper figure from a results folder.

    python analyses/make_figures.py                          # runs the default demo first if needed
    python analyses/make_figures.py --results results/demo --out figures --format png

Writes RESULTS/report.html (the summary tables and every figure in one page that opens offline) and each
figure into --out as a small HTML file (they share --out/plotly.min.js: move the folder, not one file) and
a PNG. PNG export uses kaleido with a Chromium (Debian: ``apt-get install chromium``, or point
BROWSER_PATH at one); without one, the rest is still written and one line says how to get the PNGs.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

from reversion_lens.export import PngUnavailableWarning
from reversion_lens.report import write_report

DEFAULT_RESULTS = Path("results/demo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, help="an existing results folder (default: run the demo into results/demo)")
    ap.add_argument("--out", type=Path, default=Path("figures"), help="where to write the figures (default: figures/)")
    ap.add_argument("--format", choices=("html", "png", "both"), default="both")
    args = ap.parse_args(argv)
    results = args.results
    if results is None:
        results = DEFAULT_RESULTS
        if not (results / "summary.json").exists():
            from reversion_lens.toyworld.demo import main as demo

            print(f"no results in {results}: running the default demo first")
            demo(["--out", str(results), "--figures", "none"])
    formats = {"html": ("html",), "png": ("png",), "both": ("html", "png")}[args.format]
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the skip is printed below, once
        warnings.simplefilter("ignore", PngUnavailableWarning)
        report = write_report(results, args.out, formats=formats)
    for name, paths in report.figures.items():
        print(f"{name:22s} " + "  ".join(str(p) for p in paths))
    if report.plotlyjs:
        print(f"{'(shared plotly.js)':22s} {report.plotlyjs}")
    print(f"report: {report.html} ({report.html.stat().st_size / 1e6:.1f} MB, opens offline)")
    if report.png_skipped:
        print(f"PNG export unavailable: {report.png_skipped}", file=sys.stderr)
    print(f"{len(report.paths)} files in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
