"""Compare our MLX models with mlx-vlm's (a peer, not the reference) on the same original-layout weights.

mlx-vlm must not go into the project's virtual environment. Make a separate one that also sees the project's
packages, install mlx-vlm there without its (large, unneeded) dependency set, and run from the repository root:

    python -m venv <venv>
    echo "<project venv>/lib/python3.11/site-packages" > <venv>/lib/python3.11/site-packages/project.pth
    <venv>/bin/pip install --no-deps mlx-vlm==0.7.10
    <venv>/bin/python scripts/compare_mlx_vlm.py --deepseek <snapshot dir> --paddle <snapshot dir>

Snapshots are original hub layouts (`scripts/make_checkpoint.py ... --size tiny` works). Everything runs in
float32 on the CPU. PaddleOCR-VL is compared as a whole model (mlx-vlm loads the original snapshot and reads
every dimension from config.json). mlx-vlm's DeepSeek-OCR cannot load the original config and hard-codes
SAM/CLIP sizes (`SAMViTConfig()` defaults, `net_2` 256 -> 512), so a tiny snapshot is compared per component
built at the snapshot's sizes: SAM blocks, the CLIP tower and the decoder. Prints one line per comparison:
max |ours - theirs| relative to max |ours|, and "match" under 1e-4. Exit status 0 whatever the result: the
differences are findings (see the DeepSeek-OCR and PaddleOCR-VL RULES), not failures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import deepseek_ocr as cd  # noqa: E402
from common import paddleocr_vl as pv  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import deepseek_ocr as md  # noqa: E402
from mlx_ocr import paddleocr_vl as mp  # noqa: E402

MATCH = 1e-4


def report(name: str, ours: mx.array, theirs: mx.array) -> float:
    a, b = np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32))
    if a.shape != b.shape:
        print(f"{name:40s} shape differs: ours {a.shape} vs mlx-vlm {b.shape}")
        return float("inf")
    rel = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
    extra = ""
    if a.ndim >= 1 and a.shape[-1] > 1000:  # logits: does the greedy token agree?
        same = np.array_equal(a.reshape(-1, a.shape[-1]).argmax(-1), b.reshape(-1, b.shape[-1]).argmax(-1))
        extra = f"  argmax {'same' if same else 'DIFFERS'}"
    print(f"{name:40s} rel max diff {rel:.2e}  {'match' if rel < MATCH else 'DIFFERS'}{extra}")
    return rel


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    return Image.fromarray(np.clip(base * 0.6 + rng.integers(0, 102, (height, width, 3)), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- DeepSeek-OCR

def compare_deepseek(snapshot: Path) -> None:
    from mlx_vlm.models.deepseekocr import config as vcfg
    from mlx_vlm.models.deepseekocr import sam as vsam
    from mlx_vlm.models.deepseekocr import vision as vvision
    from mlx_vlm.models.deepseekocr.language import LanguageModel

    ours = md.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
    cfg = ours.config
    rng = np.random.default_rng(0)

    # SAM blocks at a 640 view (grid 40): window padding 40 -> 42, global rel-pos tables resized 127 -> 79.
    s = cfg.sam
    for index, block in enumerate(ours.model.sam_model.blocks):
        theirs = vsam.Block(s.width, s.heads, mlp_ratio=s.mlp_ratio, use_rel_pos=True, window_size=block.window,
                            input_size=(s.grid, s.grid))
        theirs.load_weights(tree_flatten(block.parameters()), strict=True)
        kind = "windowed" if block.window else "global"
        # Grid 64 (a 1024 view) needs no table resize: a global block matching there but not at 40 points
        # at the rel-pos interpolation.
        for grid in (40, 64) if not block.window else (40,):
            x = mx.array(rng.standard_normal((1, grid, grid, s.width)).astype(np.float32))
            report(f"SAM block {index} ({kind}) @ grid {grid}", block(x), theirs(x))

    # CLIP tower on SAM features at 512 / 640 / 1024 views (n = 8, 10, 16).
    c = cfg.clip
    vconfig = vcfg.VisionConfig(model_type="vision", layers=c.layers, hidden_size=c.width,
                                intermediate_size=c.intermediate_size, num_attention_heads=c.heads,
                                image_size=c.image_size, patch_size=c.patch_size)
    theirs_clip = vvision.VisionModel(vconfig)
    theirs_clip.load_weights(tree_flatten(ours.model.vision_model.parameters()), strict=True)
    for n in (8, 10, 16):
        feats = mx.array(rng.standard_normal((1, n, n, c.width)).astype(np.float32))
        report(f"CLIP tower @ {n}x{n}", ours.model.vision_model(feats),
               theirs_clip(mx.zeros((1, 1, 1, 3)), patch_embeds=feats))
    # The same tower with the official activation (quick_gelu) and LayerNorm eps (1e-5) put into mlx-vlm's:
    # what is left at 8 and 10 is its position-table resize.
    fixed = vvision.VisionModel(vcfg.VisionConfig(**{**vconfig.__dict__, "layer_norm_eps": 1e-5}))
    fixed.load_weights(tree_flatten(ours.model.vision_model.parameters()), strict=True)
    for layer in fixed.transformer.layers:
        layer.mlp.activation_fn = lambda x: x * mx.sigmoid(md.QUICK_GELU_SCALE * x)
    for n in (8, 10, 16):
        feats = mx.array(rng.standard_normal((1, n, n, c.width)).astype(np.float32))
        report(f"CLIP, mlx-vlm + quick_gelu/eps @ {n}x{n}", ours.model.vision_model(feats),
               fixed(mx.zeros((1, 1, 1, 3)), patch_embeds=feats))

    # Decoder: text-only prompt, logits at every position (their full-sequence forward vs ours).
    lm = cfg.language
    tconfig = vcfg.TextConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        moe_intermediate_size=lm.moe_intermediate_size, num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
        n_shared_experts=lm.n_shared_experts, n_routed_experts=lm.n_routed_experts,
        num_experts_per_tok=lm.num_experts_per_tok, first_k_dense_replace=lm.first_k_dense_replace,
        rms_norm_eps=lm.rms_norm_eps, rope_theta=lm.rope_theta, qk_nope_head_dim=0, qk_rope_head_dim=0)
    theirs_lm = LanguageModel(tconfig)
    original = {}
    for shard in sorted(snapshot.glob("*.safetensors")):
        original.update(mx.load(str(shard)))
    language = {"language_model." + k: v for k, v in original.items()
                if k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))}
    language = {k[len("language_model."):]: v for k, v in theirs_lm.sanitize(language).items()}
    theirs_lm.load_weights(list(language.items()), strict=True)
    tok = Tokenizer.from_files(snapshot / "tokenizer.json", snapshot / "tokenizer_config.json")
    inputs = cd.build_inputs("The quick brown fox jumps over the lazy dog. " * 8, [], tok, base_size=1024,
                             image_size=640, crop_mode=True)
    report("decoder, text-only prefill logits", ours.prefill(inputs, None, None),
           theirs_lm(mx.array(inputs.input_ids)[None]).logits[:, -1])


# ----------------------------------------------------------------------------------------------- PaddleOCR-VL

def compare_paddle(snapshot: Path, long_page: bool) -> None:
    from mlx_vlm.models.paddleocr_vl import vision as vvision
    from mlx_vlm.utils import load_model

    ours = mp.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
    width = ours.config.text.hidden_size
    if width != 1024:
        # mlx-vlm hard-codes the projector's output width (1024, the real model's); build it at this one's.
        original = vvision.PaddleOCRProjector

        class Projector(original):
            def __init__(self, dim, context_dim, spatial_merge_size) -> None:
                super().__init__(dim, width, spatial_merge_size)

        vvision.PaddleOCRProjector = Projector
        print(f"(mlx-vlm's projector width 1024 is hard-coded; patched to {width} to load this snapshot)")
    theirs = load_model(snapshot)
    theirs.set_dtype(mx.float32)
    tok = Tokenizer.from_files(snapshot / "tokenizer.json")
    template = pv.load_chat_template(snapshot)
    pre = json.loads((snapshot / "preprocessor_config.json").read_text())
    cases = [("short line 300x40", [_noise(300, 40, 1)]), ("page 1190x742", [_noise(1190, 742, 6)]),
             ("two images", [_noise(400, 300, 9), _noise(120, 700, 10)])]
    if long_page:
        cases.append(("A4 page 2480x3508 (> 2048 image tokens)", [_noise(2480, 3508, 2)]))
    for name, images in cases:
        inputs = pv.build_inputs("OCR:", images, tok, template, pre)
        v = ours.config.vision
        patches = inputs.pixel_values.reshape(1, -1, v.num_channels, v.patch_size, v.patch_size)  # its layout
        logits = theirs(mx.array(inputs.input_ids)[None], pixel_values=mx.array(patches),
                        image_grid_thw=mx.array(inputs.image_grid_thw))
        logits = getattr(logits, "logits", logits)
        report(f"prefill logits, {name}", ours.prefill(inputs, ours.encode_images(inputs), None), logits[:, -1])
    print(f"projector pre-norm eps: mlx-vlm {theirs.visual.projector.pre_norm.eps}, ours {ours.mlp_AR.pre_norm.eps}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepseek", type=Path, help="DeepSeek-OCR snapshot directory (original layout)")
    parser.add_argument("--paddle", type=Path, help="PaddleOCR-VL snapshot directory (original layout)")
    parser.add_argument("--long-page", action="store_true", help="add an A4 page (slow on CPU)")
    args = parser.parse_args(argv)
    if not (args.deepseek or args.paddle):
        parser.error("give --deepseek and/or --paddle")
    mx.set_default_device(mx.cpu)
    if args.deepseek:
        print(f"== DeepSeek-OCR ({args.deepseek.name})")
        compare_deepseek(args.deepseek)
    if args.paddle:
        print(f"== PaddleOCR-VL ({args.paddle.name})")
        compare_paddle(args.paddle, args.long_page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
