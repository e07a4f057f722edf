"""Write a random-weight checkpoint directory laid out exactly like a model's hub snapshot.

    python scripts/make_checkpoint.py deepseek-ocr --size tiny --out ds-tiny
    python scripts/make_checkpoint.py paddleocr-vl --size full --out pv-full --seed 0

`tiny` builds in seconds (tests use it through a cached fixture); `full` has the real dimensions (benchmarks).
Real tensor names and config.json structure, tokenizer files with the special tokens at their real ids, weights
from a seed scaled so activations stay near unit variance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib  # noqa: E402

from common.models import FAMILIES  # noqa: E402

#: Model id -> build(out_dir, *, size, seed, dtype), from the module each family names.
BUILDERS = {model_id: importlib.import_module(family.checkpoint_builder).build
            for model_id, family in FAMILIES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="directory to create (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="storage dtype (default: float32 for tiny, bfloat16 for full, as on the hub)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty; refusing to overwrite")
    dtype = args.dtype or ("float32" if args.size == "tiny" else "bfloat16")
    BUILDERS[args.model](args.out, size=args.size, seed=args.seed, dtype=dtype)
    print(f"wrote {args.model} ({args.size}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
