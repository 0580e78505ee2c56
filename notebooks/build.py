"""Execute ``explore.ipynb`` and save it with its outputs, so the repository page shows them.

    python notebooks/build.py            # the default toy preset (histories from the shared cache)
    python notebooks/build.py --small    # the tiny configuration the tests run

The notebook is written atomically; figures carry a PNG copy when kaleido and a Chromium are installed.
"""

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from reversion_lens.io import atomic_write_text

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the tiny configuration (what the tests execute)")
    ap.add_argument("--notebook", type=Path, default=HERE / "explore.ipynb")
    args = ap.parse_args(argv)
    os.environ["RL_NOTEBOOK_SMALL"] = "1" if args.small else "0"
    t0 = time.perf_counter()
    nb = nbformat.read(args.notebook, as_version=4)
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:  # stable files: no per-run metadata
        cell.metadata.pop("execution", None)
    atomic_write_text(args.notebook, nbformat.writes(nb) + "\n")
    print(f"executed {args.notebook} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
