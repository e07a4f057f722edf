"""What both backends' weight quantization share: the options, the snapshot marker in config.json, and the
parts of writing a converted snapshot that touch no tensor.

A converted snapshot's config.json carries `"quantization": {"bits", "group_size", "mode", "format"}`. The key
is the format marker (a loader that sees it skips `sanitize`, so no layout change runs twice) and `format` says
which backend wrote the tensors: "mlx" (also when absent, as in snapshots written before torch could quantize)
or "torch". The two layouts differ (see torch_ocr/quantize.py), so each backend refuses the other's snapshot
with one line naming the backend that loads it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError
from .models import family_ids, family_of_config

MARKER_KEY = "quantization"
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
FORMATS = ("mlx", "torch")
# Snapshot files NOT copied as they are: the weights and config.json are rewritten; the rest (tokenizer,
# templates, preprocessing and generation configs) is copied unchanged.
_REWRITTEN_SUFFIXES = (".safetensors", ".safetensors.index.json")
_REWRITTEN_NAMES = ("config.json", ".complete")


def check_options(bits: int, group_size: int, source: str = "--quantize") -> None:
    """Raise a one-line `UserError` unless `bits` is 4 or 8 and `group_size` 32, 64 or 128."""
    if bits not in BITS:
        raise UserError(f"{source}: quantization bits must be 4 or 8, got {bits}", param="quantize")
    if group_size not in GROUP_SIZES:
        raise UserError(f"{source}: quantization group size must be 32, 64 or 128, got {group_size}",
                        param="quantize")


def marker_format(marker: dict[str, Any]) -> str:
    """The backend whose layout a converted snapshot holds ("mlx" when the marker predates the field)."""
    return str(marker.get("format", "mlx"))


def read_config(config_path: Path, backend: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json as a dict without the format marker, and the marker (None for an original checkpoint).

    With `backend`, a snapshot another backend wrote is a `UserError` saying which `--backend` loads it.
    """
    try:
        raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: not a readable JSON file ({exc})") from None
    marker = raw.pop(MARKER_KEY, None) if isinstance(raw, dict) else None
    if marker is not None:
        check_options(int(marker.get("bits", 0)), int(marker.get("group_size", 0)), source=str(config_path))
        written_by = marker_format(marker)
        if written_by not in FORMATS:
            raise UserError(f"{config_path}: unknown quantized snapshot format {written_by!r}", param="model_dir")
        if backend is not None and written_by != backend:
            name = "MLX" if written_by == "mlx" else "torch"
            raise UserError(f"{Path(config_path).parent} is a {name}-quantized snapshot; load it with "
                            f"--backend {written_by}", param="model_dir")
    return raw, marker


def kind_of(raw: dict[str, Any], model_dir: Path) -> str:
    """The model id whose family claims config.json's `model_type`."""
    model_type = str(raw.get("model_type", ""))
    family = family_of_config(raw)
    if family is None:
        raise UserError(f"{model_dir}/config.json: cannot tell the model from model_type {model_type!r} "
                        f"(known models: {', '.join(family_ids())})")
    return family.id


def prepare_output(model_dir: Path, output_dir: Path) -> dict[str, Any]:
    """Checks before any work: the source is an original checkpoint, the output is absent or empty.

    Returns the source's config.json (without a marker, since it has none).
    """
    raw, marker = read_config(model_dir / "config.json")
    if marker is not None:
        raise UserError(f"{model_dir} is already a quantized snapshot ({marker})")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"{output_dir} exists and is not empty; refusing to overwrite")
    return raw


def copy_snapshot_files(model_dir: Path, output_dir: Path) -> None:
    """Copy every file of the snapshot that conversion does not rewrite (tokenizer, templates, configs)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in _REWRITTEN_NAMES and not path.name.endswith(_REWRITTEN_SUFFIXES):
            shutil.copy2(path, output_dir / path.name)


def write_config(output_dir: Path, raw: dict[str, Any], marker: dict[str, Any]) -> None:
    """config.json of a converted snapshot: the original keys plus the marker."""
    (output_dir / "config.json").write_text(json.dumps({**raw, MARKER_KEY: marker}, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")
