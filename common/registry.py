"""Known model ids, where each is published, and which of its files we need (kept for existing callers).

The specs live with their families (`common/models/`); this module lists them. Both hubs host the same
repositories under the same names, so one `repo` serves Hugging Face and ModelScope. Only the files listed are
downloaded: the remote Python code, READMEs, assets and (for PaddleOCR-VL) the PP-DocLayoutV2 layout model are
not used by this project.
"""
from __future__ import annotations

from .models import FAMILIES, ModelSpec, get_family

__all__ = ["MODELS", "MODEL_IDS", "ModelSpec", "get_model"]

MODELS: dict[str, ModelSpec] = {model_id: family.spec for model_id, family in FAMILIES.items()}

MODEL_IDS: tuple[str, ...] = tuple(MODELS)


def get_model(model_id: str) -> ModelSpec:
    """The registry entry for `model_id`; an unknown id raises `UnknownModelError` listing the known ones."""
    return get_family(model_id).spec
