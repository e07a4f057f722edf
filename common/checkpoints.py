"""Where a checkpoint's tensors live: a safetensors file, a sharded index, or a snapshot directory.

Framework-free, shared by both backends' loaders.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFilesError


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
