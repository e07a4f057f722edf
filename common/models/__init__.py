"""The model registry: one `ModelFamily` per model id, in the order the front ends list them.

Front ends, config validation and the pipeline loop over `FAMILIES` and call a family's methods; no code outside
a family's own files compares model ids. Adding a model: README.md, "Adding a model".
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..errors import UnknownModelError, UserError
from . import deepseek_ocr, deepseek_ocr2, glm_ocr, paddleocr_vl, paddleocr_vl_1_5
from .family import SIDE_FILES, ModelFamily, ModelOption, ModelSpec, read_json

__all__ = ["FAMILIES", "ModelFamily", "ModelOption", "ModelSpec", "SIDE_FILES", "check_family_options",
           "family_ids", "family_of_config", "family_of_model_type", "get_family", "model_options", "option_owner", "read_json"]

FAMILIES: dict[str, ModelFamily] = {family.id: family for family in (
    deepseek_ocr.FAMILY, paddleocr_vl.FAMILY, paddleocr_vl_1_5.FAMILY, deepseek_ocr2.FAMILY,
    glm_ocr.FAMILY)}


def family_ids() -> tuple[str, ...]:
    """Every known model id, registry order (the first is the default model)."""
    return tuple(FAMILIES)


def get_family(model_id: str) -> ModelFamily:
    """The family of `model_id`; an unknown id raises `UnknownModelError` listing the known ones."""
    try:
        return FAMILIES[model_id]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {model_id!r} (known: {', '.join(FAMILIES)})") from None


def family_of_model_type(model_type: str) -> ModelFamily | None:
    """The first family whose config.json `model_type` this is, or None (see `family_of_config`)."""
    return next((f for f in FAMILIES.values() if f.matches_model_type(model_type)), None)


def family_of_config(config: Mapping[str, Any]) -> ModelFamily | None:
    """The family of a parsed config.json: its `model_type`, then `matches_config` where families share one."""
    model_type = str(config.get("model_type", ""))
    return next((f for f in FAMILIES.values() if f.matches_model_type(model_type) and f.matches_config(config)),
                None)


def option_owner(name: str) -> ModelFamily | None:
    """The family that owns the [inference] key `name` (e.g. "task"), or None for a key every model takes."""
    return next((f for f in FAMILIES.values() if name in f.option_names), None)


def model_options() -> tuple[ModelOption, ...]:
    """Every family's own options, registry order; an option several families share (`task`) appears once, with
    the union of their choices and presets (each family still refuses a choice it does not have)."""
    merged: dict[str, ModelOption] = {}
    for option in (option for family in FAMILIES.values() for option in family.options):
        seen = merged.get(option.name)
        merged[option.name] = option if seen is None else ModelOption(
            option.name, tuple(dict.fromkeys((*seen.choices, *option.choices))),
            {**option.presets, **seen.presets})
    return tuple(merged.values())


def check_family_options(model_id: str, given: Mapping[str, Any], *, flag: Callable[[str], str] | None = None,
                         hint: Callable[[ModelFamily], str] | None = None) -> None:
    """Refuse an option of another family that was given (not None): "--task is a PaddleOCR-VL option".

    `flag(name)` spells the option as the caller's user typed it (default: the bare name); `hint(owner)` returns
    a suggestion appended after a semicolon (e.g. "add --model paddleocr-vl").
    """
    for name, value in given.items():
        owner = option_owner(name)
        own = FAMILIES.get(model_id)
        if value is None or owner is None or (own is not None and name in own.option_names):
            continue
        spelled = flag(name) if flag is not None else name
        extra = f"; {hint(owner)}" if hint is not None else ""
        raise UserError(f"{spelled} is a {owner.display_name} option{extra}", param=name)
