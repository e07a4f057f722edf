"""Random-weight PaddleOCR-VL 1.5 snapshot: v1's (`scripts/ckpt_paddleocr_vl.py`: same config.json, tensor names,
stand-in tokenizer) with the 1.5 side files, its preprocessor_config.json (min/max pixels) and chat template
(`tests/data/reference/paddleocr-vl-1.5/`, see SOURCES.md there).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from scripts import ckpt_paddleocr_vl as v1

REFERENCE = v1.ROOT / "tests" / "data" / "reference" / "paddleocr-vl-1.5"


def build(out_dir: str | Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """v1's snapshot, then the 1.5 preprocessor config and chat template (also inside tokenizer_config.json)."""
    out = v1.build(out_dir, size=size, seed=seed, dtype=dtype)
    for name in ("preprocessor_config.json", "chat_template.jinja"):
        shutil.copyfile(REFERENCE / name, out / name)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = (REFERENCE / "chat_template.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return out
