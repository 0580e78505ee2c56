"""Write the README's results table from a demo results folder (the numbers are generated, never typed).

    python analyses/readme_results.py --results results/demo --wall 290   # copy its summary, rewrite the README
    python analyses/readme_results.py                            # rewrite the README from the committed copy
    python analyses/readme_results.py --check                    # exit 1 if the README differs from it

``--results`` copies the folder's ``summary.json`` and the machine it ran on (``config.json``'s
environment) into ``figures/demo_summary.json``, the committed source of the table; the README's block
between ``<!-- results:begin`` and ``<!-- results:end -->`` is then what :func:`render` writes from it.
The test suite checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reversion_lens.io import atomic_write_text, read_json, write_json  # noqa: E402
from reversion_lens.pipeline.results import render_markdown  # noqa: E402

SUMMARY = ROOT / "figures" / "demo_summary.json"
README = ROOT / "README.md"
BEGIN = "<!-- results:begin (written by `python analyses/readme_results.py`; do not edit by hand) -->"
END = "<!-- results:end -->"
SECTIONS = ("## The paper's claims beside ours", "## Per arm at step T", "## Paired differences against `none`")


def collect(results: Path, wall_s: float | None = None) -> dict[str, Any]:
    """The committed record: the summary and where, when and how long it ran."""
    env = read_json(results / "config.json").get("environment", {})
    machine = {k: env.get(k) for k in ("cpu", "cpus", "torch_threads", "date", "python", "platform", "git_commit")}
    return {"summary": read_json(results / "summary.json"), "machine": machine,
            "versions": env.get("versions", {}), "wall_s": wall_s}  # fmt: skip


def render(record: dict[str, Any]) -> str:
    """The README block: the summary's claim, per-arm and paired tables, then the machine and date."""
    md = render_markdown(record["summary"]).splitlines()
    keep, on = [], False
    for line in md:
        if line.startswith("## "):
            on = line.startswith(SECTIONS)
            if on:
                while keep and not keep[-1].strip():
                    keep.pop()
                keep += ["", "#" + line]  # one level below the README's section
            continue
        if on:
            keep.append(line)
    while keep and not keep[-1].strip():
        keep.pop()
    s, m = record["summary"], record["machine"]
    preset = s["config"].get("toy", {}).get("preset", "default")
    head = (
        f"Results of `reversion-lens demo` ({s['n_seeds']} seeds, the `{preset}` preset, T = {s['config']['steps']}); "
        f"mean ± std across seeds [95% bootstrap interval of the mean], paired differences with a sign-flip "
        f"and a t test. Run on {m.get('date')} on {m.get('cpu')} ({m.get('cpus')} CPUs, "
        f"torch {record['versions'].get('torch')}, commit {str(m.get('git_commit'))[:7]})"
        + (f" in {record['wall_s'] / 60:.1f} min wall, imports included" if record.get("wall_s") else "")
        + "."
    )
    return "\n".join([BEGIN, "", head, *keep, "", END])


def rewrite(readme: str, block: str) -> str:
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"README.md has no '{BEGIN}' ... '{END}' block to write into.")
    return readme[:i] + block + readme[j + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, help="a demo results folder to take the numbers from")
    p.add_argument("--wall", type=float, help="the cold run's wall time in seconds (the demo prints it)")
    p.add_argument("--check", action="store_true", help="exit 1 if the README differs from the committed summary")
    args = p.parse_args(argv)
    if args.results is not None:
        write_json(SUMMARY, collect(args.results, args.wall))
    if not SUMMARY.exists():
        raise SystemExit(f"{SUMMARY} is missing: run with --results DIR (a finished `reversion-lens demo` folder).")
    record = json.loads(SUMMARY.read_text())
    text = README.read_text()
    new = rewrite(text, render(record))
    if args.check:
        if new != text:
            print("README.md's results block differs from figures/demo_summary.json; run analyses/readme_results.py")
            return 1
        return 0
    if new != text:
        atomic_write_text(README, new)
    print(f"README.md results block written from {SUMMARY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
