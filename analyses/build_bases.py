"""Build the pretrained toy bases shipped with the package (``reversion_lens/toyworld/bases/``).

    python analyses/build_bases.py --seeds 12          # the default preset, seeds 0..11 (what the demo uses)

Pretraining is the toy demo's longest phase (~60 s CPU a seed) and, measured by
``analyses/variance_sources.py``, the main source of its seed-to-seed spread and the only phase whose
outcome changes on another CPU's float path (alignment and fine-tuning on AVX2 kernels left every harm
rate unchanged; pretraining on them moved harm by 10 points on average). Shipped, every machine starts the
alignment from the same bits and skips the phase. Each base is the history cache's own folder
(``pretrain-<key>/``: ``base/{config.json, model.safetensors}``, ``meta.json``), trained by
:func:`reversion_lens.toyworld.build_history` (or taken from the cache where it already is), and
``MANIFEST.json`` records its seed, key, checksum and first pretraining losses, which
``tests/test_toyworld_bases.py`` recomputes to check the recipe.
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from reversion_lens.io import atomic_write_text, default_cache_dir
from reversion_lens.toyworld import PRETRAIN_FIELDS, ToyConfig
from reversion_lens.toyworld.history import BASES, CACHE_VERSION, _pretrained, pretraining_losses

N_LOSSES = 20  # first pretraining losses recorded per base (what the test recomputes)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--cache-dir", type=Path, help="history cache to take (or train) bases from")
    args = ap.parse_args(argv)
    config = ToyConfig.preset(args.preset)
    root = (args.cache_dir or default_cache_dir()) / "toyworld"
    root.mkdir(parents=True, exist_ok=True)
    BASES.mkdir(parents=True, exist_ok=True)
    manifest = {"preset": args.preset, "cache_version": CACHE_VERSION, "bases": {}}
    for seed in range(args.seeds):
        name = f"pretrain-{config.key(seed, PRETRAIN_FIELDS)}"
        if not (root / name / "meta.json").exists():  # trained once, into the cache
            _pretrained(config, seed, root, progress=False)
        dst = BASES / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(root / name, dst, ignore=shutil.ignore_patterns(".*"))
        manifest["bases"][str(seed)] = {
            "folder": name,
            "sha256": sha256(dst / "base" / "model.safetensors"),
            "losses": pretraining_losses(config, seed, N_LOSSES),
        }
        print(f"seed {seed}: {name}")
    atomic_write_text(BASES / "MANIFEST.json", json.dumps(manifest, indent=1) + "\n")
    print(f"{args.seeds} bases -> {BASES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
