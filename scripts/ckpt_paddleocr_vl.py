"""Random-weight PaddleOCR-VL (v1) snapshot, laid out like `PaddlePaddle/PaddleOCR-VL` on the hub.

Writes config.json (the real structure; dimensions shrunk for `tiny`), preprocessor_config.json,
generation_config.json, chat_template.jinja, a stand-in tokenizer and `model.safetensors` holding every ORIGINAL
tensor name of the real file, the two unused groups included (`packing_position_embedding`, `vision_model.head`),
which loaders must skip by name.

The real ERNIE-4.5 SentencePiece vocabulary is not available, so the tokenizer is a byte-level BPE that keeps
the real special tokens at their real ids: 256 byte tokens, letter-pair merges, then space-prefixed filler words
up to `vocab_size`, so every id decodes to some text. Weights are drawn from the seed with std 1/sqrt(fan_in)
(unit-variance activations); query/key projections get a larger gain so attention is peaked enough that a wrong
position encoding visibly changes the logits.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "reference" / "paddleocr-vl"

# Rows of the unused NaViT packing table in the original file (the original remote code builds it with 32768).
PACKING_POSITIONS = 32768

# Dimensions of the tiny test model; everything else is the real config's.
TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
}
TINY_MROPE_SECTION = [2, 3, 3]
TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 378,  # 27 x 27 position grid, as in the real model
}

QK_GAIN = 2.0

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def make_config(size: str = "tiny", dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json dict: the real one, with the tiny dimensions substituted for `size="tiny"`."""
    config = json.loads((REFERENCE / "config.json").read_text())
    if size == "tiny":
        config.update(TINY_TEXT)
        config["rope_scaling"]["mrope_section"] = list(TINY_MROPE_SECTION)
        config["vision_config"].update(TINY_VISION)
    elif size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    config["torch_dtype"] = dtype
    config["vision_config"]["torch_dtype"] = dtype
    return config


def tensor_plan(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every (original name, shape) of `model.safetensors` for a config.json dict, sorted by name."""
    v = config["vision_config"]
    vh, vi, patch, chans = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["num_channels"]
    merged = vh * v["spatial_merge_size"] ** 2
    th, ti, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    plan: list[tuple[str, tuple[int, ...]]] = [
        ("lm_head.weight", (vocab, th)),
        ("mlp_AR.linear_1.bias", (merged,)), ("mlp_AR.linear_1.weight", (merged, merged)),
        ("mlp_AR.linear_2.bias", (th,)), ("mlp_AR.linear_2.weight", (th, merged)),
        ("mlp_AR.pre_norm.bias", (vh,)), ("mlp_AR.pre_norm.weight", (vh,)),
        ("model.embed_tokens.weight", (vocab, th)), ("model.norm.weight", (th,)),
    ]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (th,)), (p + "post_attention_layernorm.weight", (th,)),
            (p + "mlp.gate_proj.weight", (ti, th)), (p + "mlp.up_proj.weight", (ti, th)),
            (p + "mlp.down_proj.weight", (th, ti)),
            (p + "self_attn.q_proj.weight", (heads * hd, th)), (p + "self_attn.k_proj.weight", (kv_heads * hd, th)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, th)), (p + "self_attn.o_proj.weight", (th, heads * hd)),
        ]
    e = "visual.vision_model."
    grid = v["image_size"] // patch
    plan += [
        (e + "embeddings.packing_position_embedding.weight", (PACKING_POSITIONS, vh)),
        (e + "embeddings.patch_embedding.bias", (vh,)),
        (e + "embeddings.patch_embedding.weight", (vh, chans, patch, patch)),
        (e + "embeddings.position_embedding.weight", (grid * grid, vh)),
        (e + "post_layernorm.bias", (vh,)), (e + "post_layernorm.weight", (vh,)),
        (e + "head.attention.in_proj_bias", (3 * vh,)), (e + "head.attention.in_proj_weight", (3 * vh, vh)),
        (e + "head.attention.out_proj.bias", (vh,)), (e + "head.attention.out_proj.weight", (vh, vh)),
        (e + "head.layernorm.bias", (vh,)), (e + "head.layernorm.weight", (vh,)),
        (e + "head.mlp.fc1.bias", (vi,)), (e + "head.mlp.fc1.weight", (vi, vh)),
        (e + "head.mlp.fc2.bias", (vh,)), (e + "head.mlp.fc2.weight", (vh, vi)),
        (e + "head.probe", (1, 1, vh)),
    ]
    for i in range(v["num_hidden_layers"]):
        p = f"{e}encoder.layers.{i}."
        plan += [(p + f"layer_norm{n}.{k}", (vh,)) for n in (1, 2) for k in ("bias", "weight")]
        plan += [(p + "mlp.fc1.bias", (vi,)), (p + "mlp.fc1.weight", (vi, vh)),
                 (p + "mlp.fc2.bias", (vh,)), (p + "mlp.fc2.weight", (vh, vi))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            plan += [(p + f"self_attn.{proj}.bias", (vh,)), (p + f"self_attn.{proj}.weight", (vh, vh))]
    return sorted(plan)


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor whose scale suits its role, so activations stay near unit variance through the stack."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name and leaf in ("weight", "bias")
    if is_norm and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if leaf in ("bias", "in_proj_bias") or is_norm:
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(("embed_tokens.weight", "position_embedding.weight", "probe")):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    gain = QK_GAIN if ("q_proj" in name or "k_proj" in name) else 1.0
    return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))


def _special_tokens() -> dict[str, int]:
    """Name -> real id of every special token (verified and assumed) in special_tokens.json."""
    data = json.loads((REFERENCE / "special_tokens.json").read_text())
    return {name: entry["id"] for group in ("verified", "assumed") for name, entry in data[group].items()}


def _filler(index: int) -> str:
    """A space-prefixed four-letter pseudo-word (byte-level 'Ġ' is the space), unique per index."""
    letters = []
    for _ in range(4):
        index, rem = divmod(index, 26)
        letters.append(chr(ord("a") + rem))
    return "\u0120" + "".join(reversed(letters))


def build_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE `tokenizers.Tokenizer` with the real special ids and every id below vocab_size decodable."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = _special_tokens()
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab: dict[str, int] = dict(specials)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(byte_chars):
        vocab[ch] = next(free)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    merges = [(a, b) for a in ["\u0120", *letters] for b in letters]
    for a, b in merges:
        vocab[a + b] = next(free)
    filler = 0
    for token_id in free:
        vocab[_filler(filler)] = token_id
        filler += 1
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    return tok


def _tokenizer_config(template: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "padding_side": "left",
        "extra_special_tokens": {"image_token": "<|IMAGE_PLACEHOLDER|>"},
        "chat_template": template,
    }


def build(out_dir: str | Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write the snapshot directory; returns it. `dtype` is the storage dtype of the safetensors file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = make_config(size, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("preprocessor_config.json", "generation_config.json", "chat_template.jinja"):
        shutil.copyfile(REFERENCE / name, out / name)
    template = (REFERENCE / "chat_template.jinja").read_text()
    build_tokenizer(config["vocab_size"]).save(str(out / "tokenizer.json"))
    tok_config = _tokenizer_config(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token",
                                              "sep_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    _write_safetensors(out / "model.safetensors", tensor_plan(config), torch_dtype, seed)
    return out


def _write_safetensors(path: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int) -> None:
    """Stream tensors into a safetensors file one at a time, so a full-size build never holds every weight:
    8-byte little-endian header length, the JSON header (name -> dtype, shape, byte offsets), then the data."""
    item = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in plan:
        size = math.prod(shape) * item
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in plan:
            tensor = _random_tensor(name, shape, gen).to(dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def full_plan_from_reference() -> list[tuple[str, tuple[int, ...]]]:
    """The plan for the real config.json (no tensor allocated)."""
    return tensor_plan(copy.deepcopy(json.loads((REFERENCE / "config.json").read_text())))
