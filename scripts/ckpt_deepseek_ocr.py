"""Random-weight DeepSeek-OCR snapshots in the real hub layout (config.json, tokenizer files, safetensors + index).

The tensor names and shapes come from one plan (`tensor_plan`) computed from the parsed config, so a test can
compare the full-size plan with the real manifest without allocating anything. Weights are drawn per tensor from
a generator seeded by (seed, crc32(name)): a tensor's values do not depend on which other tensors exist.
The safetensors file is written tensor by tensor (header first, then each tensor's bytes), so the 6.7 GB
full-size build holds one tensor in memory at a time. NumPy only: bfloat16 is produced by rounding float32 bits.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.model_config import DeepseekOCRConfig  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference" / "deepseek-ocr"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
WEIGHTS_FILE = "model-00001-of-000001.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
EOS_ROW_SCALE = 0.1  # shrinks lm_head's EOS row so greedy decoding of random weights rarely stops at once

# Tiny dimensions: SAM keeps the real 1024/16/14 geometry (real image sizes), everything else shrinks.
TINY_SAM = {"width": 32, "layers": 4, "heads": 2, "global_attn_indexes": [1, 3],
            "downsample_channels": [32, 64], "out_chans": 16}
TINY_CLIP = {"width": 64, "layers": 2, "heads": 4}
TINY_LANGUAGE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 3,
                 "first_k_dense_replace": 1, "intermediate_size": 128, "moe_intermediate_size": 32,
                 "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3}


def config_dict(size: str) -> dict[str, Any]:
    """The config.json to write: the real one for "full", the real structure with tiny dimensions for "tiny"."""
    real = json.loads((REFERENCE / "config.json").read_text(encoding="utf-8"))
    if size == "full":
        return real
    if size != "tiny":
        raise ValueError(f"unknown size {size!r} (tiny or full)")
    cfg = copy.deepcopy(real)
    # The decoder keys appear twice (top level and language_config); keep both copies equal.
    cfg["language_config"].update(TINY_LANGUAGE)
    cfg.update(TINY_LANGUAGE)
    cfg["vision_config"]["width"]["sam_vit_b"].update(TINY_SAM)
    cfg["vision_config"]["width"]["clip-l-14-224"].update(TINY_CLIP)
    cfg["projector_config"]["input_dim"] = TINY_CLIP["width"] + TINY_SAM["downsample_channels"][-1]
    cfg["projector_config"]["n_embed"] = TINY_LANGUAGE["hidden_size"]
    return cfg


def tensor_plan(cfg: DeepseekOCRConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor (original name, shape) for a config, sorted by name like the hub file."""
    plan: dict[str, tuple[int, ...]] = {}
    sam, clip, lm = cfg.sam, cfg.clip, cfg.language

    def linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
        plan[f"{prefix}.weight"] = (out_dim, in_dim)
        if bias:
            plan[f"{prefix}.bias"] = (out_dim,)

    def norm(prefix: str, dim: int, bias: bool = True) -> None:
        plan[f"{prefix}.weight"] = (dim,)
        if bias:
            plan[f"{prefix}.bias"] = (dim,)

    s = "model.sam_model"
    plan[f"{s}.patch_embed.proj.weight"] = (sam.width, 3, sam.patch_size, sam.patch_size)
    plan[f"{s}.patch_embed.proj.bias"] = (sam.width,)
    plan[f"{s}.pos_embed"] = (1, sam.grid, sam.grid, sam.width)
    for i in range(sam.layers):
        b = f"{s}.blocks.{i}"
        span = sam.grid if i in sam.global_attn_indexes else sam.window_size
        norm(f"{b}.norm1", sam.width)
        norm(f"{b}.norm2", sam.width)
        linear(f"{b}.attn.qkv", 3 * sam.width, sam.width)
        linear(f"{b}.attn.proj", sam.width, sam.width)
        plan[f"{b}.attn.rel_pos_h"] = (2 * span - 1, sam.head_dim)
        plan[f"{b}.attn.rel_pos_w"] = (2 * span - 1, sam.head_dim)
        linear(f"{b}.mlp.lin1", sam.width * sam.mlp_ratio, sam.width)
        linear(f"{b}.mlp.lin2", sam.width, sam.width * sam.mlp_ratio)
    plan[f"{s}.neck.0.weight"] = (sam.out_chans, sam.width, 1, 1)
    norm(f"{s}.neck.1", sam.out_chans)
    plan[f"{s}.neck.2.weight"] = (sam.out_chans, sam.out_chans, 3, 3)
    norm(f"{s}.neck.3", sam.out_chans)
    first, second = sam.downsample_channels
    plan[f"{s}.net_2.weight"] = (first, sam.out_chans, 3, 3)
    plan[f"{s}.net_3.weight"] = (second, first, 3, 3)

    v = "model.vision_model"
    plan[f"{v}.embeddings.class_embedding"] = (clip.width,)
    plan[f"{v}.embeddings.patch_embedding.weight"] = (clip.width, 3, clip.patch_size, clip.patch_size)
    plan[f"{v}.embeddings.position_embedding.weight"] = (clip.grid ** 2 + 1, clip.width)
    norm(f"{v}.pre_layrnorm", clip.width)
    for i in range(clip.layers):
        b = f"{v}.transformer.layers.{i}"
        norm(f"{b}.layer_norm1", clip.width)
        norm(f"{b}.layer_norm2", clip.width)
        linear(f"{b}.self_attn.qkv_proj", 3 * clip.width, clip.width)
        linear(f"{b}.self_attn.out_proj", clip.width, clip.width)
        linear(f"{b}.mlp.fc1", clip.intermediate_size, clip.width)
        linear(f"{b}.mlp.fc2", clip.width, clip.intermediate_size)

    linear("model.projector.layers", cfg.n_embed, cfg.projector_input_dim)
    plan["model.image_newline"] = (cfg.n_embed,)
    plan["model.view_seperator"] = (cfg.n_embed,)

    d, hd = lm.hidden_size, lm.head_dim
    plan["model.embed_tokens.weight"] = (lm.vocab_size, d)
    for i in range(lm.num_hidden_layers):
        b = f"model.layers.{i}"
        norm(f"{b}.input_layernorm", d, bias=False)
        norm(f"{b}.post_attention_layernorm", d, bias=False)
        linear(f"{b}.self_attn.q_proj", lm.num_attention_heads * hd, d, bias=False)
        linear(f"{b}.self_attn.k_proj", lm.num_key_value_heads * hd, d, bias=False)
        linear(f"{b}.self_attn.v_proj", lm.num_key_value_heads * hd, d, bias=False)
        linear(f"{b}.self_attn.o_proj", d, lm.num_attention_heads * hd, bias=False)
        if lm.is_moe_layer(i):
            plan[f"{b}.mlp.gate.weight"] = (lm.n_routed_experts, d)
            mlps = [(f"{b}.mlp.experts.{e}", lm.moe_intermediate_size) for e in range(lm.n_routed_experts)]
            mlps.append((f"{b}.mlp.shared_experts", lm.moe_intermediate_size * lm.n_shared_experts))
        else:
            mlps = [(f"{b}.mlp", lm.intermediate_size)]
        for prefix, width in mlps:
            linear(f"{prefix}.gate_proj", width, d, bias=False)
            linear(f"{prefix}.up_proj", width, d, bias=False)
            linear(f"{prefix}.down_proj", d, width, bias=False)
    norm("model.norm", d, bias=False)
    linear("lm_head", lm.vocab_size, d, bias=False)
    return sorted(plan.items())


def init_tensor(name: str, shape: tuple[int, ...], seed: int, eos_token_id: int) -> np.ndarray:
    """Random float32 values scaled to keep activations near unit variance; nonzero wherever the model reads."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    normal = rng.standard_normal(shape, dtype=np.float32)
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "neck.1.", "neck.3."))
    if leaf == "bias":
        return normal * 0.05
    if is_norm:  # LayerNorm / LayerNorm2d / RMSNorm gains around one
        return 1.0 + 0.1 * normal
    if leaf in ("rel_pos_h", "rel_pos_w"):
        # q . R has std sqrt(head_dim) * scale: this gives a rel-pos bias of about unit size.
        return normal / np.sqrt(shape[-1])
    if leaf in ("pos_embed",) or name.endswith("position_embedding.weight"):
        return normal * 0.5
    if leaf in ("class_embedding", "image_newline", "view_seperator") or name.endswith("embed_tokens.weight"):
        return normal
    fan_in = int(np.prod(shape[1:]))
    out = normal / np.sqrt(fan_in)
    if name == "lm_head.weight":
        out[eos_token_id] *= EOS_ROW_SCALE
    return out


def _to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the storage dtype's raw little-endian bytes (bfloat16 as rounded-to-nearest-even uint16)."""
    if dtype == "float32":
        return values.astype("<f4", copy=False)
    if dtype == "float16":
        return values.astype("<f2")
    bits = values.astype("<f4", copy=False).view("<u4")
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype("<u2")


def _header(plan: list[tuple[str, tuple[int, ...]]], dtype: str) -> tuple[bytes, int]:
    """The safetensors header (length prefix + JSON padded to 8 bytes) and the total data size."""
    itemsize = 4 if dtype == "float32" else 2
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in plan:
        size = int(np.prod(shape)) * itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _tensors(plan: list[tuple[str, tuple[int, ...]]], seed: int, eos: int) -> Iterator[tuple[str, np.ndarray]]:
    for name, shape in plan:
        yield name, init_tensor(name, shape, seed, eos)


def build(out_dir: Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> None:
    """Write a complete snapshot directory at `out_dir` (created; existing files with the same names replaced)."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} ({', '.join(SAFETENSORS_DTYPES)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = config_dict(size)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    cfg = DeepseekOCRConfig.from_file(out_dir / "config.json")
    for name in COPIED_FILES:
        shutil.copyfile(REFERENCE / name, out_dir / name)

    plan = tensor_plan(cfg)
    header, total = _header(plan, dtype)
    with open(out_dir / WEIGHTS_FILE, "wb") as f:
        f.write(header)
        for _, values in _tensors(plan, seed, cfg.language.eos_token_id):
            f.write(_to_storage(values, dtype).tobytes())
    index = {"metadata": {"total_size": total}, "weight_map": {name: WEIGHTS_FILE for name, _ in plan}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
