"""Random-weight GLM-OCR snapshot, laid out like `zai-org/GLM-OCR` on the hub.

Writes config.json (the real structure; dimensions shrunk for `tiny`), preprocessor_config.json,
generation_config.json, chat_template.jinja, tokenizer_config.json, a stand-in tokenizer and `model.safetensors`
holding every ORIGINAL tensor name of the real file, the multi-token-prediction layer
(`model.language_model.layers.{num_hidden_layers}.*`) included, which loaders must skip by index.

The real GLM tokenizer is not available: the stand-in is a byte-level BPE with the 256 byte tokens at ids 0..255
in byte order (so "\\n" is id 10, as in the real one), letter-pair merges, filler words up to the vocab size and
the real special tokens at their real ids (tests/data/reference/glm-ocr/special_tokens.json). Weight scales are
`ckpt_paddleocr_vl`'s, and so is the streaming safetensors writer.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from scripts.ckpt_paddleocr_vl import ROOT, _filler, _write_safetensors

REFERENCE = ROOT / "tests" / "data" / "reference" / "glm-ocr"

TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
}
TINY_MROPE_SECTION = [2, 3, 3]
TINY_VISION = {"hidden_size": 32, "depth": 2, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64}


def make_config(size: str = "tiny", dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json dict: the real one, with the tiny dimensions substituted for `size="tiny"`."""
    config = json.loads((REFERENCE / "config.json").read_text())
    if size == "tiny":
        config["text_config"].update(TINY_TEXT)
        config["text_config"]["rope_parameters"]["mrope_section"] = list(TINY_MROPE_SECTION)
        config["vision_config"].update(TINY_VISION)
    elif size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    config["text_config"]["dtype"] = dtype
    return config


def tensor_plan(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every (original name, shape) of `model.safetensors` for a config.json dict, sorted by name."""
    t, v = config["text_config"], config["vision_config"]
    th, ti, hd, vocab = t["hidden_size"], t["intermediate_size"], t["head_dim"], t["vocab_size"]
    heads, kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
    vh, vi, out, m = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"], v["spatial_merge_size"]
    patch, frames, chans = v["patch_size"], v["temporal_patch_size"], v.get("in_channels", 3)
    head = vh // v["num_heads"]
    lm = "model.language_model."
    plan: list[tuple[str, tuple[int, ...]]] = [
        ("lm_head.weight", (vocab, th)), (lm + "embed_tokens.weight", (vocab, th)), (lm + "norm.weight", (th,)),
    ]
    layers = t["num_hidden_layers"]
    for i in range(layers + t.get("num_nextn_predict_layers", 0)):
        p = f"{lm}layers.{i}."
        plan += [(p + f"{n}.weight", (th,)) for n in ("input_layernorm", "post_attention_layernorm",
                                                     "post_mlp_layernorm", "post_self_attn_layernorm")]
        plan += [
            (p + "mlp.gate_up_proj.weight", (2 * ti, th)), (p + "mlp.down_proj.weight", (th, ti)),
            (p + "self_attn.q_proj.weight", (heads * hd, th)), (p + "self_attn.k_proj.weight", (kv_heads * hd, th)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, th)), (p + "self_attn.o_proj.weight", (th, heads * hd)),
        ]
        if i >= layers:  # the multi-token-prediction layer: its own embedding, projections and head
            plan += [
                (p + "eh_proj.weight", (th, 2 * th)), (p + "embed_tokens.weight", (vocab, th)),
                (p + "enorm.weight", (th,)), (p + "hnorm.weight", (th,)),
                (p + "shared_head.head.weight", (vocab, th)), (p + "shared_head.norm.weight", (th,)),
            ]
    e = "model.visual."
    context = out * chans
    plan += [
        (e + "downsample.bias", (out,)), (e + "downsample.weight", (out, vh, m, m)),
        (e + "merger.down_proj.weight", (out, context)), (e + "merger.gate_proj.weight", (context, out)),
        (e + "merger.up_proj.weight", (context, out)), (e + "merger.proj.weight", (out, out)),
        (e + "merger.post_projection_norm.bias", (out,)), (e + "merger.post_projection_norm.weight", (out,)),
        (e + "patch_embed.proj.bias", (vh,)), (e + "patch_embed.proj.weight", (vh, chans, frames, patch, patch)),
        (e + "post_layernorm.weight", (vh,)),
    ]
    for i in range(v["depth"]):
        p = f"{e}blocks.{i}."
        plan += [
            (p + "attn.q_norm.weight", (head,)), (p + "attn.k_norm.weight", (head,)),
            (p + "attn.qkv.bias", (3 * vh,)), (p + "attn.qkv.weight", (3 * vh, vh)),
            (p + "attn.proj.bias", (vh,)), (p + "attn.proj.weight", (vh, vh)),
            (p + "mlp.gate_proj.bias", (vi,)), (p + "mlp.gate_proj.weight", (vi, vh)),
            (p + "mlp.up_proj.bias", (vi,)), (p + "mlp.up_proj.weight", (vi, vh)),
            (p + "mlp.down_proj.bias", (vh,)), (p + "mlp.down_proj.weight", (vh, vi)),
            (p + "norm1.weight", (vh,)), (p + "norm2.weight", (vh,)),
        ]
    return sorted(plan)


def special_tokens() -> dict[str, int]:
    data = json.loads((REFERENCE / "special_tokens.json").read_text())
    return {entry["content"]: entry["id"] for entry in data["tokens"]}


def build_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE `tokenizers.Tokenizer`: byte b at id b, the real special ids, every id decodable."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = special_tokens()
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update(specials)
    taken = set(vocab.values())
    free = (i for i in range(vocab_size) if i not in taken)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    merges = [(a, b) for a in ["\u0120", *letters] for b in letters]
    for a, b in merges:
        vocab[a + b] = next(free)
    for filler, token_id in enumerate(free):
        vocab[_filler(filler)] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    return tok


def _byte_of(char: str) -> int:
    """The byte a byte-level alphabet character stands for (GPT-2's printable remapping)."""
    code = ord(char)
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build(out_dir: str | Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write the snapshot directory; returns it. `dtype` is the storage dtype of the safetensors file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = make_config(size, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("preprocessor_config.json", "generation_config.json", "chat_template.jinja",
                 "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, out / name)
    build_tokenizer(config["text_config"]["vocab_size"]).save(str(out / "tokenizer.json"))
    _write_safetensors(out / "model.safetensors", tensor_plan(config), torch_dtype, seed)
    return out


def full_plan_from_reference() -> list[tuple[str, tuple[int, ...]]]:
    """The plan for the real config.json (no tensor allocated)."""
    return tensor_plan(copy.deepcopy(json.loads((REFERENCE / "config.json").read_text())))
