"""The reference side of scripts/bench.py: one configuration of a reference implementation, timed like ours.

    python scripts/bench_reference.py --model paddleocr-vl --checkpoint SNAPSHOT --inputs INPUTS.npz \
        --dtype float32 --max-new-tokens 32 --result OUT.json        # also paddleocr-vl-1.5, glm-ocr, deepseek-ocr-2
    REFVENV/bin/python scripts/bench_reference.py --model deepseek-ocr --reference-code DIR ...

bench.py runs this file in a fresh subprocess per configuration; it imports neither `common` nor our backends,
so it runs unchanged in the separate environment the official DeepSeek-OCR code needs (transformers 4.46.x).
The inputs are the arrays our pipeline handed to its model (INPUTS.npz, written by bench.py), so both sides
decode the same prompt. Timing: a logits processor notes the clock each time `generate` has fresh logits (the
first time right after the prefill forward, then once per decoded token); forward hooks on the vision tower and
projector time the image encoding, which both references run inside their first forward.

- PaddleOCR-VL and PaddleOCR-VL 1.5: transformers' `PaddleOCRVLForConditionalGeneration.from_pretrained(snapshot,
  dtype=...)` (one architecture for both), greedy (`do_sample=False`), exactly N tokens
  (`min_new_tokens=max_new_tokens=N`), `mm_token_type_ids` marking the image tokens as its processor returns them
  (without them its generate falls back to 1D text positions).
- GLM-OCR: transformers' `GlmOcrForConditionalGeneration.from_pretrained(snapshot, dtype=...)`, the same way.
- DeepSeek-OCR-2: transformers' `DeepseekOcr2ForConditionalGeneration`, which reads the ORIGINAL tensors through
  its conversion mapping but needs its own config.json: one is written for the snapshot's sizes (read from the
  original config.json here, see `deepseek2_config`) into a scratch folder beside links to the snapshot's files,
  and the load must report nothing missing, unexpected or mis-shaped. Greedy with the no-repeat 20-gram rule
  our default applies (OCR-2's `infer()` keeps OCR-1's).
- DeepSeek-OCR: the official remote code from `--reference-code DIR` (never part of this repository), loaded with
  `attn_implementation="eager"` (its only CPU attention), called as its `infer()` calls `generate` (greedy,
  no-repeat 20-gram, which our default sampling also applies), but on our inputs and without `infer()`'s
  bfloat16 casts, so float32 runs in float32. `.cuda()` is made a no-op: the official forward calls it on CPU
  tensors.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import resource
import sys
import tempfile
import time
import types
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

OFFICIAL_PACKAGE = "deepseek_ocr_official"
#: The models this harness has a reference for (DeepSeek-OCR's needs its own environment; the rest run here).
MODELS = ("deepseek-ocr", "paddleocr-vl", "paddleocr-vl-1.5", "deepseek-ocr-2", "glm-ocr")
#: `infer()` decodes with no_repeat_ngram_size 20 (OCR-1 and OCR-2), as our default sampling does.
DEEPSEEK_NO_REPEAT_NGRAM = 20


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Clock:
    """Clock reads at each logits step (a logits processor that changes nothing) and inside vision modules."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.vision_s = 0.0
        self._entered: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(time.perf_counter())
        return scores

    def watch(self, modules: list[torch.nn.Module]) -> None:
        """Add the wall time of every call of `modules` to `vision_s` (they run one after the other)."""
        for module in modules:
            module.register_forward_pre_hook(lambda *_: self._entered.append(time.perf_counter()))
            module.register_forward_hook(lambda *_: self._leave())

    def _leave(self) -> None:
        self.vision_s += time.perf_counter() - self._entered.pop()

    def reset(self) -> None:
        self.steps, self.vision_s = [], 0.0


def timed_generate(model: Any, clock: _Clock, kwargs: dict[str, Any], tokens: int, **options: Any) -> dict[str, Any]:
    """One greedy `generate` of exactly `tokens` new tokens; stage timings in our stage names (ms)."""
    from transformers import LogitsProcessor, LogitsProcessorList  # noqa: PLC0415

    class Tick(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return clock(input_ids, scores)

    clock.reset()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**kwargs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                use_cache=True, logits_processor=LogitsProcessorList([Tick()]), **options)
    total_s = time.perf_counter() - started
    first, last = clock.steps[0], clock.steps[-1]
    prompt_tokens = int(kwargs["input_ids"].shape[1])
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": int(output.shape[1]) - prompt_tokens,
        "ttft_ms": (first - started) * 1000.0, "wall_s": total_s,
        "timings_ms": {"vision.compute_embeddings": clock.vision_s * 1000.0,
                       "decode.prefill": (first - started - clock.vision_s) * 1000.0,
                       "decode.iterative": (last - first) * 1000.0, "decode.generate": total_s * 1000.0},
        "timing_calls": {"vision.compute_embeddings": 1, "decode.prefill": 1,
                         "decode.iterative": len(clock.steps) - 1, "decode.generate": 1},
    }


# ------------------------------------------------------------------------------------------------- PaddleOCR-VL
def _config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))


def load_paddle(checkpoint: Path, dtype: torch.dtype) -> tuple[Any, list[torch.nn.Module], str]:
    import transformers  # noqa: PLC0415

    model = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype).eval()
    name = f"transformers {transformers.__version__} PaddleOCRVLForConditionalGeneration"
    return model, [model.model.visual, model.model.projector], name


def _ids(arrays: dict[str, np.ndarray], image_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and mm_token_type_ids (1 on image tokens) of one prompt, as a batch of one."""
    ids = torch.from_numpy(arrays["input_ids"]).to(torch.int64)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == image_token_id).to(torch.int32)}


def paddle_kwargs(checkpoint: Path, arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """Our (patches, C*p*p) pixel rows in transformers' (patches, C, p, p) layout; positions it derives itself."""
    config = _config(checkpoint)
    vision = config["vision_config"]
    patch, channels = vision["patch_size"], vision.get("num_channels", 3)
    return {**_ids(arrays, config["image_token_id"]),
            "pixel_values": torch.from_numpy(arrays["pixel_values"]).reshape(-1, channels, patch, patch).to(dtype),
            "image_grid_thw": torch.from_numpy(arrays["image_grid_thw"]).to(torch.int64)}


# ------------------------------------------------------------------------------------------------- GLM-OCR
def load_glm(checkpoint: Path, dtype: torch.dtype) -> tuple[Any, list[torch.nn.Module], str]:
    import transformers  # noqa: PLC0415

    model = transformers.GlmOcrForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype).eval()
    name = f"transformers {transformers.__version__} GlmOcrForConditionalGeneration"
    return model, [model.model.visual], name  # the patch merger is part of `visual`


def glm_kwargs(checkpoint: Path, arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """Our (patches, C*T*p*p) pixel rows are already transformers' layout."""
    return {**_ids(arrays, _config(checkpoint)["image_token_id"]),
            "pixel_values": torch.from_numpy(arrays["pixel_values"]).to(dtype),
            "image_grid_thw": torch.from_numpy(arrays["image_grid_thw"]).to(torch.int64)}


# ------------------------------------------------------------------------------------------------- DeepSeek-OCR-2
#: The Qwen2 encoder's sizes when `vision_config.width["qwen2-0-5b"]` names only its width (the published file
#: does): the official encoder's fixed depth, heads, KV heads and MLP width; its rope theta and norm eps.
QWEN2_ENCODER_FALLBACK = {"layers": 24, "heads": 14, "kv_heads": 2, "intermediate_size": 4864}
QWEN2_ENCODER_ROPE_THETA = 1_000_000.0
DEEPSEEK2_IMAGE_TOKEN_ID = 128815  # `<image>` in the tokenizer (OCR-1's)


def deepseek2_config(original: dict[str, Any]) -> dict[str, Any]:
    """transformers' DeepseekOcr2Config arguments for the sizes in an original DeepSeek-OCR-2 config.json.

    The decoder block is `language_config` (repeated at top level); SAM and the encoder are under
    `vision_config.width`. SAM's second downsample width in the published file is stale: its last conv outputs
    the encoder width. `vision_config.mlp_ratio` is not SAM's (which keeps 4).
    """
    lang = original.get("language_config", original)
    width = original["vision_config"]["width"]
    sam, qwen = width["sam_vit_b"], width["qwen2-0-5b"]
    enc = {key: qwen.get(key, value) for key, value in QWEN2_ENCODER_FALLBACK.items()}
    sam_config = {"hidden_size": sam["width"], "num_hidden_layers": sam["layers"],
                  "num_attention_heads": sam["heads"], "global_attn_indexes": list(sam["global_attn_indexes"]),
                  "downsample_channels": [sam["downsample_channels"][0], qwen["dim"]],
                  "output_channels": sam.get("out_chans", 256), "image_size": sam.get("image_size", 1024),
                  "patch_size": sam.get("patch_size", 16), "window_size": sam.get("window_size", 14),
                  "mlp_ratio": 4.0, "layer_norm_eps": 1e-6}
    encoder_config = {"hidden_size": qwen["dim"], "num_hidden_layers": enc["layers"],
                      "num_attention_heads": enc["heads"], "num_key_value_heads": enc["kv_heads"],
                      "intermediate_size": enc["intermediate_size"], "rms_norm_eps": 1e-6,
                      "rope_parameters": {"rope_type": "default", "rope_theta": QWEN2_ENCODER_ROPE_THETA}}
    layers = lang["num_hidden_layers"]
    dense = lang.get("first_k_dense_replace", 0)
    freq = lang.get("moe_layer_freq", 1)
    text_config = {
        **{key: lang[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                      "num_attention_heads", "num_key_value_heads", "n_routed_experts",
                                      "n_shared_experts", "num_experts_per_tok")},
        "num_hidden_layers": layers, "topk_method": lang.get("topk_method", "greedy"),
        "routed_scaling_factor": lang.get("routed_scaling_factor", 1.0), "n_group": 1, "topk_group": 1,
        "rms_norm_eps": lang.get("rms_norm_eps", 1e-6),
        "max_position_embeddings": lang.get("max_position_embeddings", 2048),
        "bos_token_id": lang.get("bos_token_id", 0), "eos_token_id": lang.get("eos_token_id", 1),
        "mlp_layer_types": ["sparse" if i >= dense and i % freq == 0 else "dense" for i in range(layers)],
        "rope_parameters": {"rope_type": "default", "rope_theta": lang.get("rope_theta", 10000.0)}}
    return {"vision_config": {"sam_config": sam_config, "encoder_config": encoder_config},
            "text_config": text_config, "image_token_id": DEEPSEEK2_IMAGE_TOKEN_ID}


def load_deepseek2(checkpoint: Path, dtype: torch.dtype, workdir: Path) -> tuple[Any, list[torch.nn.Module], str]:
    import transformers  # noqa: PLC0415

    scratch = workdir / "deepseek-ocr-2"
    scratch.mkdir()
    transformers.DeepseekOcr2Config(**deepseek2_config(_config(checkpoint))).save_pretrained(str(scratch))
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            (scratch / path.name).symlink_to(path.resolve())
    model, info = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(
        str(scratch), dtype=dtype, output_loading_info=True)
    wrong = {kind: names for kind, names in info.items() if names}
    if wrong:
        raise SystemExit(f"transformers did not load the snapshot as it is: {str(wrong)[:1000]}")
    model.eval()
    name = f"transformers {transformers.__version__} DeepseekOcr2ForConditionalGeneration"
    return model, [model.model.vision_tower, model.model.multi_modal_projector], name


def deepseek2_kwargs(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """One image: its 1024 px global view, its 768 px tiles (none for a small page) and their count."""
    ids = torch.from_numpy(arrays["input_ids"]).to(torch.int64)[None]
    tiles = torch.from_numpy(arrays["tiles"]).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(arrays["global_view"]).to(dtype)[None],
            "pixel_values_local": tiles if tiles.shape[0] else None,
            "num_local_patches": torch.tensor([tiles.shape[0]], dtype=torch.int64)}


def batched(kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
    """The same page as `rows` rows of one batch: per-token tensors stacked as rows, each row's pixels (patches,
    views or tiles), grids and tile counts repeated along their first axis (equal lengths: no padding)."""
    if rows == 1:
        return kwargs
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    return {key: value if value is None else
            value.repeat(rows, 1) if key in per_token else value.repeat(rows, *([1] * (value.dim() - 1)))
            for key, value in kwargs.items()}


# ------------------------------------------------------------------------------------------------- DeepSeek-OCR
def _stub_torchvision() -> None:
    """The official module imports torchvision for `infer()`'s transforms only, which this harness never calls;
    a CPU-only venv often cannot import the CUDA-linked wheel. A stub satisfies the import and fails if used."""
    try:
        import torchvision  # noqa: F401, PLC0415
        return
    except Exception:  # noqa: BLE001 - missing, or the wheel that does not load beside CPU torch
        sys.modules.pop("torchvision", None)
    import transformers.modeling_utils  # noqa: F401, PLC0415 - its package probes run before the stub exists

    def unused(*_: Any, **__: Any) -> Any:
        raise RuntimeError("torchvision is stubbed in the bench harness; infer() is not supported here")

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    root, transforms, functional = (types.ModuleType(n) for n in names)
    for module in (root, transforms, functional):  # importlib.util.find_spec refuses a module without a spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    transforms.ToTensor = transforms.Normalize = transforms.Compose = unused
    functional.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
    root.transforms, transforms.functional = transforms, functional
    sys.modules.update({"torchvision": root, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def import_official(code_dir: Path, workdir: Path) -> Any:
    """The official `modeling_deepseekocr` as a package (its files import each other relatively)."""
    files = sorted(code_dir.glob("*.py"))
    if not (code_dir / "modeling_deepseekocr.py").is_file():
        raise SystemExit(f"--reference-code {code_dir}: no modeling_deepseekocr.py there")
    package = workdir / OFFICIAL_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in files:
        (package / path.name).symlink_to(path.resolve())
    sys.path.insert(0, str(workdir))
    _stub_torchvision()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official forward moves CPU tensors with .cuda()
    return importlib.import_module(f"{OFFICIAL_PACKAGE}.modeling_deepseekocr")


def load_deepseek(checkpoint: Path, dtype: torch.dtype, code_dir: Path, workdir: Path
                  ) -> tuple[Any, list[torch.nn.Module], str]:
    official = import_official(code_dir, workdir)
    model = official.DeepseekOCRForCausalLM.from_pretrained(str(checkpoint), torch_dtype=dtype,
                                                            attn_implementation="eager").eval()
    import transformers  # noqa: PLC0415

    inner = model.model
    name = f"official, tf {transformers.__version__}"
    return model, [inner.sam_model, inner.vision_model, inner.projector], name


def deepseek_kwargs(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """`infer()`'s generate arguments built from our arrays: (tiles or a zero tile, global view) per image."""
    ids = torch.from_numpy(arrays["input_ids"]).to(torch.int64)[None]
    view = torch.from_numpy(arrays["global_view"]).to(dtype)[None]
    tiles = torch.from_numpy(arrays["tiles"]).to(dtype)
    if tiles.shape[0] == 0:  # infer() passes one all-zero tile of the global view's size when not tiled
        tiles = torch.zeros_like(view)
    return {"input_ids": ids, "images": [(tiles, view)],
            "images_seq_mask": torch.from_numpy(arrays["image_mask"]).to(torch.bool)[None],
            "images_spatial_crop": torch.from_numpy(arrays["crop"]).to(torch.int64)[None]}


# ------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    arrays = dict(np.load(args.inputs))
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        options: dict[str, Any] = {}
        if args.model in ("paddleocr-vl", "paddleocr-vl-1.5"):
            model, vision, name = load_paddle(args.checkpoint, dtype)
            kwargs = batched(paddle_kwargs(args.checkpoint, arrays, dtype), args.batch)
        elif args.model == "glm-ocr":
            model, vision, name = load_glm(args.checkpoint, dtype)
            kwargs = batched(glm_kwargs(args.checkpoint, arrays, dtype), args.batch)
        elif args.model == "deepseek-ocr-2":
            model, vision, name = load_deepseek2(args.checkpoint, dtype, Path(workdir))
            kwargs = batched(deepseek2_kwargs(arrays, dtype), args.batch)
            options = {"no_repeat_ngram_size": DEEPSEEK_NO_REPEAT_NGRAM}
        else:
            if args.reference_code is None:
                raise SystemExit("--reference-code is required for deepseek-ocr")
            model, vision, name = load_deepseek(args.checkpoint, dtype, args.reference_code, Path(workdir))
            if args.batch != 1:
                raise SystemExit("--batch: the official DeepSeek-OCR code decodes one image at a time")
            kwargs = deepseek_kwargs(arrays, dtype)
            generation = json.loads((args.checkpoint / "generation_config.json").read_text(encoding="utf-8"))
            options = {"no_repeat_ngram_size": DEEPSEEK_NO_REPEAT_NGRAM, "eos_token_id": generation["eos_token_id"]}
        load_s = time.perf_counter() - started
        rss_loaded = peak_rss_bytes()
        clock = _Clock()
        clock.watch(vision)
        if args.warmup:
            timed_generate(model, clock, kwargs, min(2, args.max_new_tokens), **options)
        record = timed_generate(model, clock, kwargs, args.max_new_tokens, **options)
    versions = {p: _version(p) for p in ("torch", "transformers")}
    return {"name": name, "versions": versions, "device": "cpu", "dtype": args.dtype, "batch": args.batch,
            "load_s": load_s, "peak_rss_after_load": rss_loaded, **record}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True, help="arrays written by bench.py")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="the same inputs as B rows of one batched generate")
    parser.add_argument("--warmup", action="store_true")
    parser.add_argument("--reference-code", type=Path, help="folder with the official DeepSeek-OCR .py files")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    record = run(args)
    record["peak_rss_bytes"] = peak_rss_bytes()
    args.result.write_text(json.dumps(record), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
