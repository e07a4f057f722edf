"""The reference side of scripts/bench.py: one configuration of a reference implementation, timed like ours.

    python scripts/bench_reference.py --model paddleocr-vl --checkpoint SNAPSHOT --inputs INPUTS.npz \
        --dtype float32 --max-new-tokens 32 --result OUT.json
    REFVENV/bin/python scripts/bench_reference.py --model deepseek-ocr --reference-code DIR ...

bench.py runs this file in a fresh subprocess per configuration; it imports neither `common` nor our backends,
so it runs unchanged in the separate environment the official DeepSeek-OCR code needs (transformers 4.46.x).
The inputs are the arrays our pipeline handed to its model (INPUTS.npz, written by bench.py), so both sides
decode the same prompt. Timing: a logits processor notes the clock each time `generate` has fresh logits (the
first time right after the prefill forward, then once per decoded token); forward hooks on the vision tower and
projector time the image encoding, which both references run inside their first forward.

- PaddleOCR-VL: transformers' `PaddleOCRVLForConditionalGeneration.from_pretrained(snapshot, dtype=...)`, greedy
  (`do_sample=False`), exactly N tokens (`min_new_tokens=max_new_tokens=N`).
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
#: `infer()` decodes with no_repeat_ngram_size 20, as our default sampling does.
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
def load_paddle(checkpoint: Path, dtype: torch.dtype) -> tuple[Any, list[torch.nn.Module], str]:
    import transformers  # noqa: PLC0415

    model = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype).eval()
    name = f"transformers {transformers.__version__} PaddleOCRVLForConditionalGeneration"
    return model, [model.model.visual, model.model.projector], name


def paddle_kwargs(checkpoint: Path, arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """Our (patches, C*p*p) pixel rows in transformers' (patches, C, p, p) layout; positions it derives itself."""
    vision = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["vision_config"]
    patch, channels = vision["patch_size"], vision.get("num_channels", 3)
    ids = torch.from_numpy(arrays["input_ids"]).to(torch.int64)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(arrays["pixel_values"]).reshape(-1, channels, patch, patch).to(dtype),
            "image_grid_thw": torch.from_numpy(arrays["image_grid_thw"]).to(torch.int64)}


def batched(kwargs: dict[str, Any], rows: int) -> dict[str, Any]:
    """The same page as `rows` rows of one batch: ids and mask stacked, each row's patches and grid repeated
    (equal lengths, so no padding is involved)."""
    if rows == 1:
        return kwargs
    return {"input_ids": kwargs["input_ids"].repeat(rows, 1),
            "attention_mask": kwargs["attention_mask"].repeat(rows, 1),
            "pixel_values": kwargs["pixel_values"].repeat(rows, 1, 1, 1),
            "image_grid_thw": kwargs["image_grid_thw"].repeat(rows, 1)}


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
        if args.model == "paddleocr-vl":
            model, vision, name = load_paddle(args.checkpoint, dtype)
            kwargs = batched(paddle_kwargs(args.checkpoint, arrays, dtype), args.batch)
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
    parser.add_argument("--model", choices=["deepseek-ocr", "paddleocr-vl"], required=True)
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
