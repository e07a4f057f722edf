"""Where a checkpoint's tensors live (a safetensors file, a sharded index, or a snapshot directory), and the one
strict-load check that compares a model's tensor names and shapes with a checkpoint's.

Framework-free, shared by both backends' loaders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from .errors import CheckpointError, ModelFilesError

#: Names listed per kind of fault in a strict-load error; the rest is counted.
LISTED_NAMES = 20


def check_strict(expected: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]]) -> None:
    """Raise `CheckpointError` unless `given` (checkpoint name -> shape) has exactly the tensors `expected`
    (model name -> shape) has, each of the same shape. The message lists the missing tensors, the unexpected
    ones and the shape mismatches by name, both backends alike."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(f"{name}: checkpoint {tuple(given[name])} vs model {tuple(expected[name])}"
                        for name in set(expected) & set(given) if tuple(expected[name]) != tuple(given[name]))
    parts = [f"{label}: {separator.join(names[:LISTED_NAMES])}"
             + (f" ... ({len(names) - LISTED_NAMES} more)" if len(names) > LISTED_NAMES else "")
             for label, separator, names in (("missing tensors", ", ", missing),
                                             ("unexpected tensors", ", ", unexpected),
                                             ("shape mismatches", "; ", mismatched)) if names]
    if parts:
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(parts))


def checkpoint_files(weights: Path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, an index json, or a directory holding either."""
    weights = Path(weights)
    if weights.is_dir():
        index = sorted(weights.glob("*.safetensors.index.json"))
        if index:
            weights = index[0]
        else:
            files = sorted(weights.glob("*.safetensors"))
            if not files:
                raise ModelFilesError(f"no .safetensors file in {weights}")
            return files
    if weights.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFilesError(f"{weights}: unreadable safetensors index ({exc})") from None
        return [weights.parent / s for s in shards]
    if not weights.is_file():
        raise ModelFilesError(f"weights file not found: {weights}")
    return [weights]
