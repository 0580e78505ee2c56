"""Regenerate every paper figure from a results folder, as self-contained HTML and PNG.

    python analyses/make_figures.py                          # runs the default demo first if needed
    python analyses/make_figures.py --results results/demo --out figures --format png

PNG export uses kaleido with a Chromium (Debian: ``apt-get install chromium``); without one, the HTML
files are still written and the script says how to get the PNGs.
"""

import argparse
import sys
import time
from pathlib import Path

from reversion_lens.export import png_available
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
    if "png" in formats:
        ok, why = png_available()
        if not ok:
            print(f"PNG export unavailable: {why}\nWriting HTML only.", file=sys.stderr)
            formats = ("html",)
    t0 = time.perf_counter()
    written = write_report(results, args.out, formats=formats)
    for name, paths in sorted(written.items()):
        print(f"{name:22s} " + "  ".join(str(p) for p in paths))
    print(f"{sum(len(p) for p in written.values())} files in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
