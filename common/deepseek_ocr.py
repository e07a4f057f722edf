"""DeepSeek-OCR, framework-free: image views, tiling, normalisation, image-token layout and prompt ids.

Exact to the official remote code (`modeling_deepseekocr.py` `infer()`, `dynamic_preprocess`,
`BasicImageTransform`, `format_messages`/`text_encode`; `conversation.py` "plain"); rules in RULES.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class DeepseekOCRImage:
    """One image's pixel views, normalised to (v/255 - 0.5) / 0.5, float32, channels first."""

    global_view: np.ndarray          # (3, S, S): S = base_size in crop mode, image_size otherwise
    tiles: np.ndarray                # (n_tiles, 3, T, T), T = image_size; n_tiles = 0 when not tiled
    crop: tuple[int, int]            # (width tiles, height tiles); (1, 1) when not tiled


@dataclass(frozen=True)
class DeepseekOCRInputs:
    """A whole prompt: BOS first, every image position holding `image_token_id`, images in prompt order."""

    input_ids: np.ndarray            # (L,) int64
    images: tuple[DeepseekOCRImage, ...] = ()

    @property
    def next_position(self) -> int:
        # Positions are 0..L-1 over the whole prompt; generation continues at L.
        return int(self.input_ids.shape[0])

    def extended(self, token_ids: Sequence[int]) -> DeepseekOCRInputs:
        ids = np.concatenate([self.input_ids, np.asarray(token_ids, dtype=np.int64)])
        return replace(self, input_ids=ids)
