"""Frozen model configs parsed from the real hub config.json files, shared by both backends.

Field names follow config.json. Sizes the official code hard-codes instead of reading from config.json (SAM's
neck width, window size, CLIP's MLP ratio) are fields with the official values as defaults, so a tiny test
checkpoint may override them with an extra key; nothing in a model file is a literal dimension.
A missing required key is a `ConfigError` naming the key and the file. Keys we do not read are listed in
`IGNORED_*` on purpose; any other key is reported once in a warning (the hub may add keys).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from dataclasses import fields as dataclasses_fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

_MISSING = object()


class _Reader:
    """Reads keys from one config dict, naming the file and the key path on errors."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: '{prefix or '<root>'}' must be an object")
        self.data, self.source, self.prefix = data, source, prefix

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        name = f"{self.prefix}{key}"
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing key '{name}'")
            return default
        value = self.data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and typ is not bool:
            raise ConfigError(f"{self.source}: '{name}' must be {getattr(typ, '__name__', typ)}, got {value!r}")
        if not isinstance(value, typ):
            tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise ConfigError(f"{self.source}: '{name}' must be {tname}, got {value!r}")
        return value

    def ints(self, key: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self.get(key, list, default)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self.source}: '{self.prefix}{key}' must be a list of integers")
        return tuple(value)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), self.source, f"{self.prefix}{key}.")

    def warn_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.data) - known)
        if unknown:
            log.warning("%s: ignoring unknown keys %s", self.source, ", ".join(self.prefix + k for k in unknown))


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None


# ----------------------------------------------------------------------------------------------- DeepSeek-OCR

@dataclass(frozen=True)
class SamConfig:
    """SAM ViT-B image encoder (`vision_config.width.sam_vit_b`)."""

    width: int
    layers: int
    heads: int
    global_attn_indexes: tuple[int, ...]
    downsample_channels: tuple[int, ...]
    # Official builder constants (deepencoder.py `_build_sam`), not in config.json.
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: int = 4
    out_chans: int = 256
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        """Side of the position-embedding table (64 for 1024 / 16)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L transformer fed with SAM features (`vision_config.width.clip-l-14-224`)."""

    width: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    mlp_ratio: int = 4  # official builder: ffn 4096 for width 1024
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def intermediate_size(self) -> int:
        return self.width * self.mlp_ratio

    @property
    def grid(self) -> int:
        """Side of the patch grid of the position table (16 for 224 / 14); the table has grid**2 + 1 rows."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class DeepseekV2Config:
    """The DeepSeek-V2 MoE decoder (`language_config`; defaults are configuration_deepseek_v2.py's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_mla: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        """DeepseekV2DecoderLayer: MoE when past the first dense layers and on the MoE frequency."""
        return index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0


def read_deepseek_v2(root: _Reader, data: dict[str, Any], source: str) -> DeepseekV2Config:
    """The DeepSeek-V2 decoder of a DeepSeek-OCR(-2) config.json (both models use this block unchanged).

    The decoder keys are repeated at top level and under language_config; the nested copy wins.
    """
    lang = root.sub("language_config") if "language_config" in data else root
    language = DeepseekV2Config(
        vocab_size=lang.get("vocab_size", int),
        hidden_size=lang.get("hidden_size", int),
        intermediate_size=lang.get("intermediate_size", int),
        moe_intermediate_size=lang.get("moe_intermediate_size", int),
        num_hidden_layers=lang.get("num_hidden_layers", int),
        num_attention_heads=lang.get("num_attention_heads", int),
        num_key_value_heads=lang.get("num_key_value_heads", int),
        n_routed_experts=lang.get("n_routed_experts", int),
        n_shared_experts=lang.get("n_shared_experts", int),
        num_experts_per_tok=lang.get("num_experts_per_tok", int),
        first_k_dense_replace=lang.get("first_k_dense_replace", int, 0),
        max_position_embeddings=lang.get("max_position_embeddings", int, 2048),
        bos_token_id=lang.get("bos_token_id", int, 0),
        eos_token_id=lang.get("eos_token_id", int, 1),
        moe_layer_freq=lang.get("moe_layer_freq", int, 1),
        topk_method=lang.get("topk_method", str, "greedy"),
        scoring_func=lang.get("scoring_func", str, "softmax"),
        norm_topk_prob=lang.get("norm_topk_prob", bool, False),
        routed_scaling_factor=lang.get("routed_scaling_factor", float, 1.0),
        rms_norm_eps=lang.get("rms_norm_eps", float, 1e-6),
        rope_theta=lang.get("rope_theta", float, 10000.0),
        use_mla=lang.get("use_mla", bool, False),
    )
    if language.use_mla:
        raise ConfigError(f"{source}: 'use_mla' true is not supported (DeepSeek-OCR ships without MLA)")
    if language.topk_method != "greedy" or language.scoring_func != "softmax":
        raise ConfigError(f"{source}: only topk_method 'greedy' with scoring_func 'softmax' is supported")
    return language


def read_sam(s: _Reader, downsample_channels: tuple[int, ...] | None = None) -> SamConfig:
    """`vision_config.width.sam_vit_b`; `downsample_channels` replaces the config's when given (OCR-2's is stale)."""
    return SamConfig(
        width=s.get("width", int), layers=s.get("layers", int), heads=s.get("heads", int),
        global_attn_indexes=s.ints("global_attn_indexes"),
        downsample_channels=downsample_channels or s.ints("downsample_channels"),
        image_size=s.get("image_size", int, 1024), patch_size=s.get("patch_size", int, 16),
        window_size=s.get("window_size", int, 14), mlp_ratio=s.get("mlp_ratio", int, 4),
        out_chans=s.get("out_chans", int, 256),
    )


IGNORED_DEEPSEEK_OCR_KEYS = {
    "_name_or_path", "architectures", "auto_map", "candidate_resolutions", "global_view_pos", "tile_tag",
    "torch_dtype", "transformers_version", "model_type", "language_config",
    "quantization",  # marker of a converted (quantized) snapshot, read by both backends' loaders
}


@dataclass(frozen=True)
class DeepseekOCRConfig:
    """DeepSeek-OCR (`deepseek-ai/DeepSeek-OCR` config.json)."""

    sam: SamConfig
    clip: ClipConfig
    language: DeepseekV2Config
    projector_input_dim: int
    projector_type: str
    n_embed: int
    # Token ids from the tokenizer, not config.json (tokenizer_config.json of the real snapshot).
    image_token_id: int = 128815
    source: str = field(default="", compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> DeepseekOCRConfig:
        return cls.from_dict(_load_json(Path(path)), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> DeepseekOCRConfig:
        root = _Reader(data, source)
        language = read_deepseek_v2(root, data, source)
        width = root.sub("vision_config").sub("width")
        sam = read_sam(width.sub("sam_vit_b"))
        c = width.sub("clip-l-14-224")
        clip = ClipConfig(
            width=c.get("width", int), layers=c.get("layers", int), heads=c.get("heads", int),
            image_size=c.get("image_size", int, 224), patch_size=c.get("patch_size", int, 14),
            mlp_ratio=c.get("mlp_ratio", int, 4),
        )
        p = root.sub("projector_config")
        cfg = cls(
            sam=sam, clip=clip, language=language,
            projector_input_dim=p.get("input_dim", int), projector_type=p.get("projector_type", str),
            n_embed=p.get("n_embed", int), source=source,
        )
        if cfg.projector_type != "linear":
            raise ConfigError(f"{source}: 'projector_config.projector_type' must be 'linear', got {cfg.projector_type!r}")
        if sam.downsample_channels[-1] != clip.width:
            raise ConfigError(f"{source}: SAM's last downsample channel count must equal the CLIP width")
        if cfg.projector_input_dim != clip.width + sam.downsample_channels[-1]:
            raise ConfigError(f"{source}: 'projector_config.input_dim' must be CLIP width + SAM output channels")
        if cfg.n_embed != language.hidden_size:
            raise ConfigError(f"{source}: 'projector_config.n_embed' must equal the decoder hidden_size")
        known_top = IGNORED_DEEPSEEK_OCR_KEYS | set(DeepseekV2Config.__dataclass_fields__) | {
            "vision_config", "projector_config", "lm_head", "rm_head", "kv_lora_rank", "q_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group"}
        root.warn_unknown(known_top)
        return cfg


# ----------------------------------------------------------------------------------------------- DeepSeek-OCR-2

#: The Qwen2-0.5B encoder sizes of the official `qwen2_d2e.py`; config.json states only `dim`.
QWEN2_ENCODER_DEFAULTS = {"layers": 24, "heads": 14, "kv_heads": 2, "intermediate_size": 4864}


@dataclass(frozen=True)
class Qwen2EncoderConfig:
    """The Qwen2 visual encoder (`vision_config.width["qwen2-0-5b"]`): causal-LM layers used as an encoder."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    # Hard-coded in the official encoder, not in config.json.
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class DeepseekOCR2Config:
    """DeepSeek-OCR-2 (`deepseek-ai/DeepSeek-OCR-2` config.json): SAM + Qwen2 encoder + DeepSeek-V2 decoder."""

    sam: SamConfig
    encoder: Qwen2EncoderConfig
    language: DeepseekV2Config
    projector_input_dim: int
    projector_type: str
    n_embed: int
    image_token_id: int = 128815
    #: Learned query banks (checkpoint name, rows): one per view size, 768 px tiles and the 1024 px global view.
    query_banks: tuple[tuple[str, int], ...] = (("query_768", 144), ("query_1024", 256))
    source: str = field(default="", compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> DeepseekOCR2Config:
        return cls.from_dict(_load_json(Path(path)), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> DeepseekOCR2Config:
        root = _Reader(data, source)
        language = read_deepseek_v2(root, data, source)
        width = root.sub("vision_config").sub("width")
        q = width.sub("qwen2-0-5b")
        encoder = Qwen2EncoderConfig(
            hidden_size=q.get("dim", int),
            num_hidden_layers=q.get("layers", int, QWEN2_ENCODER_DEFAULTS["layers"]),
            num_attention_heads=q.get("heads", int, QWEN2_ENCODER_DEFAULTS["heads"]),
            num_key_value_heads=q.get("kv_heads", int, QWEN2_ENCODER_DEFAULTS["kv_heads"]),
            intermediate_size=q.get("intermediate_size", int, QWEN2_ENCODER_DEFAULTS["intermediate_size"]),
        )
        s = width.sub("sam_vit_b")
        # The second downsample width in config.json (1024) is stale: net_3 outputs the encoder width.
        sam = read_sam(s, (s.ints("downsample_channels")[0], encoder.hidden_size))
        p = root.sub("projector_config")
        cfg = cls(sam=sam, encoder=encoder, language=language, projector_input_dim=p.get("input_dim", int),
                  projector_type=p.get("projector_type", str), n_embed=p.get("n_embed", int), source=source)
        if cfg.projector_type != "linear":
            raise ConfigError(f"{source}: 'projector_config.projector_type' must be 'linear', got {cfg.projector_type!r}")
        if cfg.projector_input_dim != encoder.hidden_size:
            raise ConfigError(f"{source}: 'projector_config.input_dim' must equal the Qwen2 encoder width")
        if cfg.n_embed != language.hidden_size:
            raise ConfigError(f"{source}: 'projector_config.n_embed' must equal the decoder hidden_size")
        if encoder.num_attention_heads % encoder.num_key_value_heads:
            raise ConfigError(f"{source}: the Qwen2 encoder's heads must be a multiple of its kv_heads")
        root.warn_unknown(IGNORED_DEEPSEEK_OCR_KEYS | set(DeepseekV2Config.__dataclass_fields__) | {
            "vision_config", "projector_config", "lm_head", "rm_head", "kv_lora_rank", "q_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group"})
        return cfg


# ----------------------------------------------------------------------------------------------- PaddleOCR-VL

@dataclass(frozen=True)
class PaddleVisionConfig:
    """The NaViT/SigLIP vision encoder (`vision_config`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    spatial_merge_size: int
    layer_norm_eps: float
    hidden_act: str
    rope_theta: float = 10000.0  # vision 2D RoPE theta: hard-coded in the reference, not in config.json

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table (27 for 384 / 14)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class PaddleTextConfig:
    """The ERNIE-4.5 dense decoder (flat top-level keys)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    use_bias: bool = False
    hidden_act: str = "silu"


IGNORED_PADDLEOCR_VL_KEYS = {
    "architectures", "auto_map", "attention_probs_dropout_prob", "compression_ratio", "hidden_dropout_prob",
    "ignored_index", "max_sequence_length", "model_type", "pad_token_id", "rope_is_neox_style", "sliding_window",
    "torch_dtype", "use_3d_rope", "use_cache", "use_flash_attention", "weight_share_add_bias",
    "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id", "rope_scaling", "vision_config",
    "text_config", "quantization",
}


@dataclass(frozen=True)
class PaddleOCRVLConfig:
    """PaddleOCR-VL v1 (`PaddlePaddle/PaddleOCR-VL` config.json)."""

    text: PaddleTextConfig
    vision: PaddleVisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    video_token_id: int
    # mlp_AR pre-norm eps: the reference hard-codes 1e-5 rather than reading the vision config's 1e-6.
    projector_layer_norm_eps: float = 1e-5
    source: str = field(default="", compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> PaddleOCRVLConfig:
        return cls.from_dict(_load_json(Path(path)), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> PaddleOCRVLConfig:
        root = _Reader(data, source)
        rope = root.sub("rope_scaling")
        text = PaddleTextConfig(
            vocab_size=root.get("vocab_size", int),
            hidden_size=root.get("hidden_size", int),
            intermediate_size=root.get("intermediate_size", int),
            num_hidden_layers=root.get("num_hidden_layers", int),
            num_attention_heads=root.get("num_attention_heads", int),
            num_key_value_heads=root.get("num_key_value_heads", int),
            head_dim=root.get("head_dim", int),
            rms_norm_eps=root.get("rms_norm_eps", float),
            rope_theta=root.get("rope_theta", float),
            mrope_section=rope.ints("mrope_section"),
            max_position_embeddings=root.get("max_position_embeddings", int, 131072),
            tie_word_embeddings=root.get("tie_word_embeddings", bool, False),
            use_bias=root.get("use_bias", bool, False),
            hidden_act=root.get("hidden_act", str, "silu"),
        )
        if sum(text.mrope_section) * 2 != text.head_dim:
            raise ConfigError(f"{source}: 'rope_scaling.mrope_section' must sum to head_dim / 2")
        v = root.sub("vision_config")
        vision = PaddleVisionConfig(
            hidden_size=v.get("hidden_size", int),
            intermediate_size=v.get("intermediate_size", int),
            num_hidden_layers=v.get("num_hidden_layers", int),
            num_attention_heads=v.get("num_attention_heads", int),
            num_channels=v.get("num_channels", int, 3),
            image_size=v.get("image_size", int),
            patch_size=v.get("patch_size", int),
            spatial_merge_size=v.get("spatial_merge_size", int, 2),
            layer_norm_eps=v.get("layer_norm_eps", float, 1e-6),
            hidden_act=v.get("hidden_act", str, "gelu_pytorch_tanh"),
        )
        root.warn_unknown(IGNORED_PADDLEOCR_VL_KEYS | {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "tie_word_embeddings", "use_bias", "hidden_act", "image_token_id", "vision_start_token_id",
            "vision_end_token_id", "video_token_id"})
        return cls(
            text=text, vision=vision,
            image_token_id=root.get("image_token_id", int),
            vision_start_token_id=root.get("vision_start_token_id", int),
            vision_end_token_id=root.get("vision_end_token_id", int),
            video_token_id=root.get("video_token_id", int, 101307),
            source=source,
        )


# ----------------------------------------------------------------------------------------------- GLM-OCR

@dataclass(frozen=True)
class GlmOcrVisionConfig:
    """The GLM-OCR vision tower (`vision_config`): Conv3d patches over two frames, RMSNorm blocks, 2x2 merge."""

    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rms_norm_eps: float
    attention_bias: bool = True
    hidden_act: str = "silu"
    in_channels: int = 3
    rope_theta: float = 10000.0  # `rope_parameters.rope_theta` when given; the reference's default otherwise

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class GlmOcrTextConfig:
    """The GLM decoder (`text_config`): sandwich-norm layers, fused gate/up MLP, interleaved M-RoPE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    eos_token_id: tuple[int, ...] = ()


IGNORED_GLM_OCR_TEXT_KEYS = {
    "model_type", "pad_token_id", "attention_bias", "attention_dropout", "initializer_range", "dtype", "torch_dtype",
    "tie_word_embeddings", "use_cache", "num_nextn_predict_layers", "rope_parameters",
}
IGNORED_GLM_OCR_VISION_KEYS = {
    "model_type", "hidden_dropout_prob", "attention_dropout", "initializer_range", "image_size", "dtype",
    "torch_dtype", "rope_parameters",
}
IGNORED_GLM_OCR_KEYS = {
    "architectures", "model_type", "transformers_version", "text_config", "vision_config", "dtype", "torch_dtype",
    "tie_word_embeddings", "quantization", "_name_or_path",
}


@dataclass(frozen=True)
class GlmOcrConfig:
    """GLM-OCR (`zai-org/GLM-OCR` config.json)."""

    text: GlmOcrTextConfig
    vision: GlmOcrVisionConfig
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    video_token_id: int
    video_start_token_id: int
    video_end_token_id: int
    source: str = field(default="", compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> GlmOcrConfig:
        return cls.from_dict(_load_json(Path(path)), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> GlmOcrConfig:
        root = _Reader(data, source)
        t = root.sub("text_config")
        rope = t.sub("rope_parameters")
        if rope.get("rope_type", str, "default") != "default":
            raise ConfigError(f"{source}: 'text_config.rope_parameters.rope_type' must be 'default'")
        eos = t.data.get("eos_token_id", ())
        heads = t.get("num_attention_heads", int)
        text = GlmOcrTextConfig(
            vocab_size=t.get("vocab_size", int),
            hidden_size=t.get("hidden_size", int),
            intermediate_size=t.get("intermediate_size", int),
            num_hidden_layers=t.get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads", int, heads),
            head_dim=t.get("head_dim", int, t.get("hidden_size", int) // heads),
            rms_norm_eps=t.get("rms_norm_eps", float),
            rope_theta=rope.get("rope_theta", float),
            mrope_section=rope.ints("mrope_section"),
            max_position_embeddings=t.get("max_position_embeddings", int, 131072),
            partial_rotary_factor=rope.get("partial_rotary_factor", float, 1.0),
            hidden_act=t.get("hidden_act", str, "silu"),
            eos_token_id=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
        )
        rotary = int(text.head_dim * text.partial_rotary_factor)
        if sum(text.mrope_section) * 2 != rotary:
            raise ConfigError(f"{source}: 'text_config.rope_parameters.mrope_section' must sum to the rotary "
                              f"dimension / 2 ({rotary // 2})")
        t.warn_unknown(IGNORED_GLM_OCR_TEXT_KEYS | {f.name for f in dataclasses_fields(GlmOcrTextConfig)})
        v = root.sub("vision_config")
        vision_rope = v.data.get("rope_parameters") or {}
        vision = GlmOcrVisionConfig(
            hidden_size=v.get("hidden_size", int),
            depth=v.get("depth", int),
            num_heads=v.get("num_heads", int),
            intermediate_size=v.get("intermediate_size", int),
            out_hidden_size=v.get("out_hidden_size", int),
            patch_size=v.get("patch_size", int),
            temporal_patch_size=v.get("temporal_patch_size", int, 2),
            spatial_merge_size=v.get("spatial_merge_size", int, 2),
            rms_norm_eps=v.get("rms_norm_eps", float, 1e-5),
            attention_bias=v.get("attention_bias", bool, True),
            hidden_act=v.get("hidden_act", str, "silu"),
            in_channels=v.get("in_channels", int, 3),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        )
        v.warn_unknown(IGNORED_GLM_OCR_VISION_KEYS | {f.name for f in dataclasses_fields(GlmOcrVisionConfig)})
        ids = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
               "video_start_token_id", "video_end_token_id")
        root.warn_unknown(IGNORED_GLM_OCR_KEYS | set(ids))
        defaults = (59280, 59256, 59257, 59281, 59258, 59259)  # the reference config class's defaults
        return cls(text=text, vision=vision, source=source,
                   **{key: root.get(key, int, default) for key, default in zip(ids, defaults)})
