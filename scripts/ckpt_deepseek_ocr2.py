"""Random-weight DeepSeek-OCR-2 snapshots in the real hub layout (config.json, DeepSeek-OCR's tokenizer files,
one safetensors shard + index).

The SAM, projector and decoder tensors are DeepSeek-OCR's plan (`ckpt_deepseek_ocr.tensor_plan`, fed a config
with OCR-2's sizes, its CLIP tower and `image_newline` dropped); the Qwen2 encoder and its query banks are added
here. Weights, bfloat16 rounding and the streamed safetensors writer are DeepSeek-OCR's.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.model_config import ClipConfig, DeepseekOCR2Config, DeepseekOCRConfig  # noqa: E402
from scripts import ckpt_deepseek_ocr as v1  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference"
REFERENCE = ROOT / "deepseek-ocr-2"
TOKENIZER_DIR = ROOT / "deepseek-ocr"  # OCR-2 ships OCR-1's tokenizer (same vocabulary and special ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS_FILE = v1.WEIGHTS_FILE
INDEX_FILE = v1.INDEX_FILE

# Tiny dimensions: SAM keeps the real 1024/16/14 geometry (real view sizes and query counts); the rest shrinks.
# The stale second downsample width of the real config (1024 for an 896 encoder) is kept stale (96 for 64).
TINY_SAM = {"width": 32, "layers": 4, "heads": 2, "global_attn_indexes": [1, 3], "downsample_channels": [32, 96],
            "out_chans": 16}
TINY_QWEN2 = {"dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 128}
TINY_LANGUAGE = v1.TINY_LANGUAGE
#: v1 names that OCR-2 does not have.
DROPPED_PREFIXES = ("model.vision_model.", "model.image_newline")


def config_dict(size: str) -> dict[str, Any]:
    """The config.json to write: the real one for "full", the real structure with tiny dimensions for "tiny"."""
    real = json.loads((REFERENCE / "config.json").read_text(encoding="utf-8"))
    if size == "full":
        return real
    if size != "tiny":
        raise ValueError(f"unknown size {size!r} (tiny or full)")
    cfg = copy.deepcopy(real)
    cfg["language_config"].update(TINY_LANGUAGE)
    cfg.update(TINY_LANGUAGE)
    cfg["vision_config"]["width"]["sam_vit_b"].update(TINY_SAM)
    cfg["vision_config"]["width"]["qwen2-0-5b"].update(TINY_QWEN2)
    cfg["projector_config"]["input_dim"] = TINY_QWEN2["dim"]
    cfg["projector_config"]["n_embed"] = TINY_LANGUAGE["hidden_size"]
    return cfg


def tensor_plan(cfg: DeepseekOCR2Config) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor (original name, shape) for a config, sorted by name like the hub file."""
    no_clip = ClipConfig(width=1, layers=0, heads=1, image_size=1, patch_size=1)
    shared = DeepseekOCRConfig(sam=cfg.sam, clip=no_clip, language=cfg.language,
                               projector_input_dim=cfg.projector_input_dim, projector_type=cfg.projector_type,
                               n_embed=cfg.n_embed)
    plan = {name: shape for name, shape in v1.tensor_plan(shared) if not name.startswith(DROPPED_PREFIXES)}
    enc, q = cfg.encoder, "model.qwen2_model"
    d, kv = enc.hidden_size, enc.num_key_value_heads * enc.head_dim
    for i in range(enc.num_hidden_layers):
        b = f"{q}.model.model.layers.{i}"
        plan[f"{b}.input_layernorm.weight"] = (d,)
        plan[f"{b}.post_attention_layernorm.weight"] = (d,)
        for proj, rows in (("q_proj", enc.num_attention_heads * enc.head_dim), ("k_proj", kv), ("v_proj", kv)):
            plan[f"{b}.self_attn.{proj}.weight"] = (rows, d)
            plan[f"{b}.self_attn.{proj}.bias"] = (rows,)
        plan[f"{b}.self_attn.o_proj.weight"] = (d, enc.num_attention_heads * enc.head_dim)
        plan[f"{b}.mlp.gate_proj.weight"] = (enc.intermediate_size, d)
        plan[f"{b}.mlp.up_proj.weight"] = (enc.intermediate_size, d)
        plan[f"{b}.mlp.down_proj.weight"] = (d, enc.intermediate_size)
    plan[f"{q}.model.model.norm.weight"] = (d,)
    for name, rows in cfg.query_banks:
        plan[f"{q}.{name}.weight"] = (rows, d)
    return sorted(plan.items())


def init_tensor(name: str, shape: tuple[int, ...], seed: int, eos_token_id: int) -> np.ndarray:
    """DeepSeek-OCR's initialisation; the query banks are unit-scale like token embeddings."""
    if ".query_" in name:
        return np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape, dtype=np.float32)
    return v1.init_tensor(name, shape, seed, eos_token_id)


def build(out_dir: Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> None:
    """Write a complete snapshot directory at `out_dir` (created; existing files with the same names replaced)."""
    if dtype not in v1.SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} ({', '.join(v1.SAFETENSORS_DTYPES)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_dict(size), indent=2) + "\n", encoding="utf-8")
    cfg = DeepseekOCR2Config.from_file(out_dir / "config.json")
    shutil.copyfile(REFERENCE / "generation_config.json", out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out_dir / name)
    plan = tensor_plan(cfg)
    header, total = v1._header(plan, dtype)
    eos = cfg.language.eos_token_id
    with open(out_dir / WEIGHTS_FILE, "wb") as f:
        f.write(header)
        for name, shape in plan:
            f.write(v1._to_storage(init_tensor(name, shape, seed, eos), dtype).tobytes())
    index = {"metadata": {"total_size": total}, "weight_map": {name: WEIGHTS_FILE for name, _ in plan}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
