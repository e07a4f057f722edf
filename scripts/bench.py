"""Speed and memory of one page through the CLI's pipeline, next to the reference implementations, in one run.

    python scripts/bench.py                                   # every model, torch, bfloat16 and float32, CPU
    python scripts/bench.py --model glm-ocr                   # one model (deepseek-ocr-2, paddleocr-vl-1.5, ...)
    python scripts/bench.py --model paddleocr-vl --dtype float32 --max-new-tokens 16 --json bench.json
    python scripts/bench.py --model deepseek-ocr --reference-code DIR --reference-python VENV/bin/python
    python scripts/bench.py --batch 1,4,8 --no-reference      # batched decode: tokens/s and pages/minute
    python scripts/bench.py --model paddleocr-vl --llama-cpp  # plus llama.cpp BF16 and Q8_0 rows

Each configuration (model x backend x dtype, ours or the reference) runs in a fresh subprocess, one after the
other, so its peak resident memory (`ru_maxrss`) is its own and two full-size models never share the RAM.
Weights are random but full size (built once per model into the user cache dir, bfloat16 on disk as on the hub),
so speed and memory are those of the real model; the text is meaningless, and decoding runs a fixed number of
tokens (`ignore_eos`). Decode is also set against its memory bound, as gpt-fast's "Bandwidth achieved":
bytes of the weights one token reads (the decoder, only the routed experts a token uses, no embedding table)
times decode tokens/s.

References, fed the very inputs our pipeline built (captured from its `generate` call, so preprocessing differs
in nothing): PaddleOCR-VL and PaddleOCR-VL 1.5 through transformers' `PaddleOCRVLForConditionalGeneration`,
GLM-OCR through its `GlmOcrForConditionalGeneration` and DeepSeek-OCR-2 through its
`DeepseekOcr2ForConditionalGeneration`, all in this interpreter, on the same snapshot files; DeepSeek-OCR through
the official remote code, which needs transformers 4.46 and so its own environment (`--reference-code`,
`--reference-python`; see `scripts/bench_reference.py`). Without them that column is skipped.

`--batch 1,4,8` runs every configuration once per batch size: B copies of the page through `Pipeline.map` (the
engine decodes them together), and for the transformers references their own batched `generate` on the same B
inputs.
Decode tokens/s is then the whole batch's (B rows x steps / decode time) and pages/minute counts B pages; vision
and prefill are per page (ours books each request its share, the reference's batched pass is divided by B).

`--llama-cpp` adds llama.cpp (`llama-mtmd-cli`, built once from a pinned source release; see
`scripts/llama_cpp_reference.py`) for DeepSeek-OCR and PaddleOCR-VL: the same snapshot converted to GGUF (text
model BF16 and Q8_0, the vision part BF16), the same page, prompt and token count, batch 1, and a table of ours
against each of its rows. It preprocesses the page itself, so its image token count can differ from ours.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.timing import STAGES  # noqa: E402
from scripts import llama_cpp_reference  # noqa: E402

MODELS = ("deepseek-ocr", "paddleocr-vl", "paddleocr-vl-1.5", "deepseek-ocr-2", "glm-ocr")
#: The models whose reference is the official remote code in its own environment (the rest use transformers here).
OFFICIAL_REFERENCE = ("deepseek-ocr",)
BACKENDS = ("torch", "mlx")
BENCH_DTYPES = ("bfloat16", "float32")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_IMAGE = ROOT / "tests" / "data" / "page.png"
#: Names of the weights a decode step reads; the vision towers, the projector and the embedding table are not.
#: GLM-OCR's decoder sits under `model.language_model.`; its layers past num_hidden_layers (multi-token
#: prediction) are never run.
DECODER_LAYER = re.compile(r"model\.(?:language_model\.)?layers\.(\d+)\.")
DECODER_PREFIXES = ("model.norm.", "model.language_model.norm.", "lm_head.")
EMBEDDING_TABLES = ("model.embed_tokens.", "model.language_model.embed_tokens.")
ROUTED_EXPERTS = ".mlp.experts."
#: A run needs about its weights at the run dtype plus this much (interpreter, activations, KV cache), in GB.
RUN_OVERHEAD_GB = 1.5
REFERENCE_HELP = """\
DeepSeek-OCR reference skipped: it needs the official remote code and transformers 4.46.x in a separate venv.
  python3 -m venv REFVENV && REFVENV/bin/pip install torch transformers==4.46.3 safetensors einops easydict addict numpy
  put the snapshot's .py files (modeling_deepseekocr.py, deepencoder.py, modeling_deepseekv2.py,
  configuration_deepseek_v2.py, conversation.py) in a folder DIR (never inside this repository), then add
  --reference-code DIR --reference-python REFVENV/bin/python"""


# ------------------------------------------------------------------------------------------------- facts
def cache_root() -> Path:
    import platformdirs  # noqa: PLC0415 - only the parent needs it

    return Path(platformdirs.user_cache_dir("deepseek-ocr", appauthor=False, opinion=False)) / "bench"


def ensure_checkpoint(model: str, seed: int = 0) -> Path:
    """The full-size random snapshot of `model`, built once (bfloat16, several minutes for DeepSeek-OCR)."""
    out = cache_root() / f"{model}-full-s{seed}"
    if (out / ".complete").exists():
        return out
    from scripts import make_checkpoint  # noqa: PLC0415 - imports torch; only needed to build

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the full-size {model} checkpoint in {out} (once) ...", flush=True)
    make_checkpoint.BUILDERS[model](tmp, size="full", seed=seed, dtype="bfloat16")
    (tmp / ".complete").write_text("ok\n")
    tmp.rename(out)  # atomic: a half-built directory is never taken for a complete one
    return out


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (name -> dtype, shape, offsets); the data is not read."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def active_weight_bytes(checkpoint: Path, model: str, dtype: str) -> tuple[int, int]:
    """(bytes one decode step reads, parameters in the checkpoint), at the run dtype's element size."""
    from common.registry import get_model  # noqa: PLC0415

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    language = config.get("language_config") or config.get("text_config") or config
    fraction = language.get("num_experts_per_tok", 1) / language.get("n_routed_experts", 1)
    tied = bool(language.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    layers = language.get("num_hidden_layers")
    active = total = 0.0
    for name, info in safetensors_header(checkpoint / get_model(model).weights[0]).items():
        count = math.prod(info["shape"])
        total += count
        layer = DECODER_LAYER.match(name)
        if name.startswith(EMBEDDING_TABLES) and tied:
            active += count  # the table is read whole as the output projection
        elif layer is not None:
            if layers is None or int(layer.group(1)) < layers:
                active += count * (fraction if ROUTED_EXPERTS in name else 1.0)
        elif name.startswith(DECODER_PREFIXES):
            active += count
    return int(active * ELEMENT_BYTES[dtype]), int(total)


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory_bytes() -> int | None:
    """MemAvailable on Linux; None elsewhere (the memory check is then skipped)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _chip() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _metal_available() -> bool | None:
    if util.find_spec("mlx") is None:
        return None
    try:
        import mlx.core as mx  # noqa: PLC0415

        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - a broken MLX install reads as "no Metal"
        return False


def _revision() -> str | None:
    """The commit measured, '+dirty' when the work tree has uncommitted edits (numbers depend on them)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def platform_info() -> dict[str, Any]:
    """What a reader needs to compare numbers between machines (a Mac user pastes this with the table)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"platform": platform.platform(), "machine": platform.machine(), "chip": _chip(),
            "cpu_count": os.cpu_count(), "memory_gb": round(memory / 1e9, 1) if memory else None,
            "python": platform.python_version(), "torch": _version("torch"), "transformers": _version("transformers"),
            "mlx": _version("mlx"), "metal_available": _metal_available(), "revision": _revision()}


# ------------------------------------------------------------------------------------------------- our worker
class _ProbedModel:
    """A backend model whose `generate` notes when the first token comes out and keeps the inputs it got."""

    def __init__(self, model: Any, probe: _Probe) -> None:
        self._model, self._probe = model, probe
        self.kind, self.backend, self.device, self.dtype = model.kind, model.backend, model.device, model.dtype

    def generate(self, inputs: Any, options: Any, timings: Any, cancel: Any = None) -> Iterator[Any]:
        self._probe.inputs, self._probe.first_token_at = inputs, None
        tokens = iter(self._model.generate(inputs, options, timings, cancel))
        try:
            for token in tokens:
                if self._probe.first_token_at is None:
                    self._probe.first_token_at = time.perf_counter()
                yield token
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def engine(self, max_batch: int) -> _ProbedEngine:
        return _ProbedEngine(self._model.engine(max_batch), self._probe)


class _ProbedEngine:
    """An engine that keeps the first inputs it got and notes when the first token comes out."""

    def __init__(self, engine: Any, probe: _Probe) -> None:
        self._engine, self._probe = engine, probe
        self.max_batch = engine.max_batch

    @property
    def active(self) -> list[int]:
        return self._engine.active

    @property
    def free_slots(self) -> int:
        return self._engine.free_slots

    def add(self, inputs: Any, options: Any, timings: Any) -> int:
        return self.add_many([(inputs, options, timings)])[0]

    def add_many(self, requests: list[tuple[Any, Any, Any]]) -> list[int]:
        if self._probe.inputs is None and requests:
            self._probe.inputs = requests[0][0]
        return self._engine.add_many(requests)

    def step(self) -> list[Any]:
        out = self._engine.step()
        if out and self._probe.first_token_at is None:
            self._probe.first_token_at = time.perf_counter()
        return out

    def abort(self, slot: int) -> None:
        self._engine.abort(slot)


@dataclass
class _Probe:
    """Stands in for the backend's `load_model` in the Pipeline; everything else is the CLI's path."""

    load_model: Callable[..., Any]
    inputs: Any = None
    first_token_at: float | None = None

    def __call__(self, kind: str, config_path: Path, weights_path: Path, *, dtype: str, device: str,
                 **options: Any) -> Any:  # options: the loader's extras (quantization), passed through unchanged
        return _ProbedModel(self.load_model(kind, config_path, weights_path, dtype=dtype, device=device,
                                            **options), self)


def _save_inputs(inputs: Any, path: Path) -> None:
    """The arrays the reference needs to see exactly what our model saw (one image)."""
    import numpy as np  # noqa: PLC0415

    from common.deepseek_ocr import IMAGE_TOKEN_ID  # noqa: PLC0415

    if hasattr(inputs, "pixel_values"):  # PaddleOCR-VL (both versions), GLM-OCR
        np.savez(path, input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                 image_grid_thw=inputs.image_grid_thw)
        return
    (image,) = inputs.images  # DeepSeek-OCR and DeepSeek-OCR-2 (same image token, same view arrays)
    np.savez(path, input_ids=inputs.input_ids, global_view=image.global_view, tiles=image.tiles,
             crop=np.asarray(image.crop, dtype=np.int64), image_mask=inputs.input_ids == IMAGE_TOKEN_ID)


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration through `common.pipeline.Pipeline`, as `deepseek-ocr-cli` drives it."""
    from common.config import load_settings  # noqa: PLC0415
    from common.images import open_image  # noqa: PLC0415
    from common.pipeline import Pipeline, Request, backend_loader, choose_backend  # noqa: PLC0415
    from common.prompts import DEFAULT_PROMPTS  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:  # built-in defaults: the user's config.toml plays no part
        (Path(tmp) / "config.toml").touch()  # an empty config.toml: the built-in defaults
        settings = load_settings(Path(tmp) / "config.toml", {
            "model": args.model, "model_dir": str(args.checkpoint), "backend": args.backend,
            "device": args.device, "dtype": args.dtype})
    probe = _Probe(backend_loader(choose_backend(args.backend)))
    pipeline = Pipeline(settings, max_resident=1, load_model=probe)
    started = time.perf_counter()
    pipeline.load(args.model)
    load_s = time.perf_counter() - started
    rss_loaded = peak_rss_bytes()
    image = open_image(str(args.image))

    def request(tokens: int) -> Request:
        return Request(prompt=DEFAULT_PROMPTS[args.model], images=[image], model=args.model,
                       overrides={"ignore_eos": True, "max_new_tokens": tokens})

    if args.warmup:
        pipeline.run(request(min(2, args.max_new_tokens)))
    probe.inputs = probe.first_token_at = None
    started = time.perf_counter()
    if args.batch == 1:
        result = pipeline.run(request(args.max_new_tokens))
    else:  # every row is admitted before the first step, so each row's decode.iterative is the batch's
        (result, *_) = list(pipeline.map([request(args.max_new_tokens)] * args.batch, batch_size=args.batch))
    wall_s = time.perf_counter() - started
    if args.save_inputs:
        _save_inputs(probe.inputs, args.save_inputs)
    ttft_ms = (probe.first_token_at - started) * 1000.0 if probe.first_token_at else None
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "backend": result.backend, "device": result.device, "dtype": result.dtype,
            "timings_ms": result.timings_ms, "timing_calls": result.timing_calls, "load_s": load_s,
            "ttft_ms": ttft_ms, "wall_s": wall_s, "peak_rss_after_load": rss_loaded, "batch": args.batch}


def worker_main(args: argparse.Namespace) -> int:
    """Hidden entry of the per-configuration subprocess: run, then write the record as JSON."""
    record = run_ours(args)
    record["peak_rss_bytes"] = peak_rss_bytes()
    Path(args.result).write_text(json.dumps(record), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------------- the parent
@dataclass
class Config:
    model: str
    impl: str                 # "ours" | "reference"
    backend: str              # ours: torch | mlx; reference: its name
    dtype: str
    checkpoint: Path
    batch: int = 1
    record: dict[str, Any] = field(default_factory=dict)


def _subprocess(command: list[str], result: Path, timeout_s: float) -> dict[str, Any]:
    """Run one configuration; its record, or {"error": why} (a crash, a kill, a timeout)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        return {"error": f"exit {done.returncode}{killed}: " + " | ".join(tail)}
    return json.loads(result.read_text(encoding="utf-8"))


def _memory_refusal(checkpoint: Path, model: str, dtype: str, factor: float, check: bool) -> str | None:
    """Why a run would not fit in the memory available now, or None: better skipped than killing others."""
    available = available_memory_bytes()
    if not check or available is None:
        return None
    _, params = active_weight_bytes(checkpoint, model, dtype)
    need = params * ELEMENT_BYTES[dtype] * factor + RUN_OVERHEAD_GB * 1e9
    if need <= available:
        return None
    return f"skipped: needs about {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available (--no-memory-check runs it)"


def measure_llama_cpp(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """A llama.cpp row (its own process, built and converted on first use) as a record of the table's fields.

    Its stages land on ours: the vision encode as vision.compute_embeddings, the prompt evaluation less that
    encode as decode.prefill, the single-token evals as decode.iterative. It has no TTFT or pages/min here."""
    outtype = config.dtype.lower()
    refusal = _memory_refusal(config.checkpoint, config.model, "bfloat16", 1.0, args.memory_check)
    if refusal:
        return {"error": refusal}
    print(f"running {config.model} llama.cpp {config.dtype} ...", flush=True)
    run = llama_cpp_reference.measure(config.model, config.checkpoint, args.image, args.max_new_tokens, outtype,
                                      threads=args.llama_cpp_threads, warmup=args.warmup, timeout_s=args.timeout)
    if "error" in run:
        return {"error": run["error"]}
    active_fp32, params = active_weight_bytes(config.checkpoint, config.model, "float32")
    active = int(active_fp32 / 4 * llama_cpp_reference.BYTES_PER_WEIGHT[outtype])
    vision_ms, prefill_ms = run["vision_ms"] or 0.0, run["prefill_ms"] or 0.0
    return {**run, "completion_tokens": run["decode_runs"], "batch": 1,
            "load_s": run["load_ms"] / 1000 if run["load_ms"] is not None else None, "ttft_ms": None,
            "timings_ms": {"vision.compute_embeddings": vision_ms, "decode.prefill": prefill_ms,
                           "decode.iterative": run["decode_ms"]},
            "timing_calls": {"vision.compute_embeddings": run["image_slices"]},
            "vision_prefill_ms": vision_ms + prefill_ms, "pages_per_min": None,
            "active_bytes_per_token": active, "params": params,
            "bandwidth_gb_s": active * run["decode_tok_s"] / 1e9 if run["decode_tok_s"] else None}


def measure(config: Config, args: argparse.Namespace, inputs: Path) -> dict[str, Any]:
    """Run `config` in its own subprocess and add the derived numbers (tokens/s, bandwidth)."""
    if config.impl == "llama.cpp":
        return measure_llama_cpp(config, args)
    result = inputs.with_name(f"{config.model}-{config.impl}-{config.backend}-{config.dtype}-b{config.batch}.json")
    common = ["--model", config.model, "--dtype", config.dtype, "--checkpoint", str(config.checkpoint),
              "--max-new-tokens", str(args.max_new_tokens), "--result", str(result), "--batch", str(config.batch)] + (
        ["--warmup"] if args.warmup else [])
    if config.impl == "ours":
        command = [sys.executable, __file__, "--worker", "--backend", config.backend, "--device", args.device,
                   "--image", str(args.image), *common] + (["--save-inputs", str(inputs)] if not inputs.exists() else [])
        factor = 1.0
    else:
        official = config.model in OFFICIAL_REFERENCE
        python = str(args.reference_python) if official else sys.executable
        command = [python, str(ROOT / "scripts" / "bench_reference.py"), "--inputs", str(inputs), *common] + (
            ["--reference-code", str(args.reference_code)] if official else [])
        # converting the bf16 file, transformers briefly holds more than the weights (mapped pages are reclaimable)
        factor = 1.0 + 0.25 * (config.dtype != "bfloat16")
    refusal = _memory_refusal(config.checkpoint, config.model, config.dtype, factor, args.memory_check)
    if refusal:
        return {"error": refusal}
    if config.impl == "reference" and not inputs.exists():
        return {"error": "skipped: no inputs captured (our run of this model failed)"}
    print(f"running {config.model} {config.impl} {config.backend} {config.dtype} batch {config.batch} ...", flush=True)
    record = _subprocess(command, result, args.timeout)
    return derive(record, config, args) if "error" not in record else record


def derive(record: dict[str, Any], config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s, vision+prefill time and achieved bandwidth from a run's stage timings."""
    stages = record["timings_ms"]
    prefill_ms, iterative_ms = stages.get("decode.prefill") or 0.0, stages.get("decode.iterative") or 0.0
    steps = max(record["completion_tokens"] - 1, 0)  # the first token comes out of the prefill
    rows = record.get("batch", 1)                     # a batched step gives one token per row
    if config.impl == "reference" and rows > 1:
        # its vision and prefill run once for the whole batch; ours are booked per request (its share)
        prefill_ms /= rows
        stages = {**stages, "vision.compute_embeddings": (stages.get("vision.compute_embeddings") or 0.0) / rows}
    active, params = active_weight_bytes(config.checkpoint, config.model, config.dtype)
    record["prefill_tok_s"] = record["prompt_tokens"] / (prefill_ms / 1000) if prefill_ms > 0 else None
    record["decode_tok_s"] = rows * steps / (iterative_ms / 1000) if iterative_ms > 0 and steps else None
    record["pages_per_min"] = rows / record["wall_s"] * 60.0 if record.get("wall_s") else None
    record["vision_prefill_ms"] = (stages.get("vision.compute_embeddings") or 0.0) + prefill_ms
    record["active_bytes_per_token"], record["params"] = active, params
    # the weights are read once per step, whatever the batch
    record["bandwidth_gb_s"] = active * record["decode_tok_s"] / rows / 1e9 if record["decode_tok_s"] else None
    return record


def llama_cpp_ratios(configs: list[Config]) -> list[dict[str, Any]]:
    """Each of our batch-1 rows against each llama.cpp row of the same model: speed-ups (> 1: ours faster) of the
    vision encode, prefill tokens/s and decode tokens/s, and peak RSS (< 1: ours smaller)."""
    theirs = [c for c in configs if c.impl == "llama.cpp" and "error" not in c.record]
    rows = []
    for c in configs:
        if c.impl != "ours" or c.batch != 1 or "error" in c.record:
            continue
        ours = c.record
        for ref in (r for r in theirs if r.model == c.model):
            rows.append({"model": c.model, "backend": c.backend, "dtype": c.dtype, "llama_cpp": ref.dtype,
                         "vision_speedup": _ratio(ref.record["timings_ms"]["vision.compute_embeddings"],
                                                  ours["timings_ms"].get("vision.compute_embeddings")),
                         "prefill_speedup": _ratio(ours["prefill_tok_s"], ref.record["prefill_tok_s"]),
                         "decode_speedup": _ratio(ours["decode_tok_s"], ref.record["decode_tok_s"]),
                         "memory_ratio": _ratio(ours["peak_rss_bytes"], ref.record["peak_rss_bytes"])})
    return rows


def ratios(configs: list[Config]) -> list[dict[str, Any]]:
    """Ours against the reference, per model and dtype: speed-ups (> 1: ours faster) and memory (< 1: ours smaller)."""
    rows = []
    refs = {(c.model, c.dtype, c.batch): c.record for c in configs
            if c.impl == "reference" and "error" not in c.record}
    for c in configs:
        ref = refs.get((c.model, c.dtype, c.batch))
        if c.impl != "ours" or ref is None or "error" in c.record:
            continue
        ours = c.record

        div = _ratio
        rows.append({"model": c.model, "backend": c.backend, "dtype": c.dtype, "batch": c.batch,
                     "vision_prefill_speedup": div(ref["vision_prefill_ms"], ours["vision_prefill_ms"]),
                     "decode_speedup": div(ours["decode_tok_s"], ref["decode_tok_s"]),
                     "ttft_speedup": div(ref["ttft_ms"], ours["ttft_ms"]),
                     "load_speedup": div(ref["load_s"], ours["load_s"]),
                     "memory_ratio": div(ours["peak_rss_bytes"], ref["peak_rss_bytes"])})
    return rows


# ------------------------------------------------------------------------------------------------- output
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(info: dict[str, Any], configs: list[Config], ratio_rows: list[dict[str, Any]], notes: list[str],
           llama_rows: list[dict[str, Any]] | None = None) -> str:
    """The readable report: platform, one summary row per configuration, stage timings, ratios, notes."""
    lines = ["platform: " + ", ".join(f"{k}={v}" for k, v in info.items())]
    head = (f"{'#':<4}{'model':<17}{'impl':<11}{'backend':<20}{'dtype':<10}{'B':>3}{'load s':>8}{'TTFT ms':>10}"
            f"{'vis+pre ms':>11}{'prompt':>7}{'prefill t/s':>12}{'decode t/s':>11}{'pages/min':>10}{'GB/s':>7}"
            f"{'peak RSS GB':>12}")
    lines += ["", head, "-" * len(head)]
    for number, c in enumerate(configs, 1):
        r = c.record
        start = f"{f'#{number}':<4}{c.model:<17}{c.impl:<11}{c.backend[:19]:<20}{c.dtype:<10}{c.batch:>3}"
        if "error" in r:
            lines.append(start + r["error"])
            continue
        lines.append(start + f"{_fmt(r['load_s']):>8}{_fmt(r['ttft_ms'], 0):>10}{_fmt(r['vision_prefill_ms'], 0):>11}"
                     f"{r['prompt_tokens']:>7}{_fmt(r['prefill_tok_s']):>12}{_fmt(r['decode_tok_s'], 2):>11}"
                     f"{_fmt(r.get('pages_per_min'), 2):>10}{_fmt(r['bandwidth_gb_s'], 2):>7}"
                     f"{_fmt(r['peak_rss_bytes'] / 1e9, 2):>12}")
    done = [(number, c) for number, c in enumerate(configs, 1) if "error" not in c.record]
    if done:
        lines += ["", "stage timings, ms (calls), per configuration #; '-' = not measured for that implementation"]
        width = 13
        lines.append(" " * 28 + "".join(f"{f'#{number}':>{width}}" for number, _ in done))
        for stage in STAGES:
            cells = []
            for _, c in done:
                value = c.record["timings_ms"].get(stage)
                calls = c.record.get("timing_calls", {}).get(stage)
                cells.append("-" if value is None else f"{value:.0f}" + (f" ({calls})" if calls else ""))
            lines.append(f"{stage:<28}" + "".join(f"{cell:>{width}}" for cell in cells))
    if ratio_rows:
        lines += ["", "ours / reference (speed-up > 1 = ours faster; memory < 1 = ours smaller)",
                  f"{'model':<17}{'backend':<8}{'dtype':<10}{'B':>3}{'vis+prefill':>12}{'decode':>8}{'TTFT':>7}"
                  f"{'load':>7}{'peak RSS':>9}"]
        for row in ratio_rows:
            lines.append(f"{row['model']:<17}{row['backend']:<8}{row['dtype']:<10}{row['batch']:>3}"
                         f"{_fmt(row['vision_prefill_speedup'], 2):>12}{_fmt(row['decode_speedup'], 2):>8}"
                         f"{_fmt(row['ttft_speedup'], 2):>7}{_fmt(row['load_speedup'], 2):>7}"
                         f"{_fmt(row['memory_ratio'], 2):>9}")
    if llama_rows:
        lines += ["", "ours / llama.cpp (speed-up > 1 = ours faster; memory < 1 = ours smaller)",
                  f"{'model':<17}{'backend':<8}{'dtype':<10}{'llama.cpp':<11}{'vision':>8}{'prefill':>9}"
                  f"{'decode':>8}{'peak RSS':>9}"]
        for row in llama_rows:
            lines.append(f"{row['model']:<17}{row['backend']:<8}{row['dtype']:<10}{row['llama_cpp']:<11}"
                         f"{_fmt(row['vision_speedup'], 2):>8}{_fmt(row['prefill_speedup'], 2):>9}"
                         f"{_fmt(row['decode_speedup'], 2):>8}{_fmt(row['memory_ratio'], 2):>9}")
    scaling = batch_scaling(configs)
    if scaling:
        lines += ["", "batch B decode throughput / batch 1 (same model, implementation, backend, dtype)",
                  f"{'model':<17}{'impl':<11}{'backend':<20}{'dtype':<10}{'B':>3}{'decode x':>10}{'pages/min x':>12}"]
        for row in scaling:
            lines.append(f"{row['model']:<17}{row['impl']:<11}{row['backend'][:19]:<20}{row['dtype']:<10}"
                         f"{row['batch']:>3}{_fmt(row['decode_scaling'], 2):>10}{_fmt(row['pages_scaling'], 2):>12}")
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


def batch_scaling(configs: list[Config]) -> list[dict[str, Any]]:
    """Each batched run against the batch-1 run of the same configuration (> 1: batching pays)."""
    ones = {(c.model, c.impl, c.backend, c.dtype): c.record for c in configs
            if c.batch == 1 and "error" not in c.record}
    rows = []
    for c in configs:
        one = ones.get((c.model, c.impl, c.backend, c.dtype))
        if c.batch == 1 or one is None or "error" in c.record:
            continue
        rows.append({"model": c.model, "impl": c.impl, "backend": c.backend, "dtype": c.dtype, "batch": c.batch,
                     "decode_scaling": _ratio(c.record["decode_tok_s"], one["decode_tok_s"]),
                     "pages_scaling": _ratio(c.record.get("pages_per_min"), one.get("pages_per_min"))})
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ------------------------------------------------------------------------------------------------- main
def _choices(value: str, allowed: tuple[str, ...], name: str) -> list[str]:
    picked = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise SystemExit(f"bench.py: --{name} {value!r}: choose from {', '.join(allowed)} or all")
    return picked


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all", help=" | ".join((*MODELS, "all")) + " (comma lists work too)")
    parser.add_argument("--backend", default="torch", help="torch | mlx | all (comma lists work too)")
    parser.add_argument("--dtype", default=",".join(BENCH_DTYPES), help="comma list of bfloat16, float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="decoded tokens, fixed (EOS ignored)")
    parser.add_argument("--batch", default="1", help="comma list of batch sizes, e.g. 1,4,8 (pages decoded together)")
    parser.add_argument("--warmup", action="store_true", help="a 2-token run before the measured one")
    parser.add_argument("--checkpoint", type=Path, help="use this snapshot (one model) instead of the full build")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--reference-code", type=Path, help="folder with the official DeepSeek-OCR .py files")
    parser.add_argument("--reference-python", type=Path, help="python of the venv with transformers 4.46.x")
    parser.add_argument("--no-reference", action="store_true", help="measure ours only")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="add llama.cpp BF16 and Q8_0 rows (DeepSeek-OCR, PaddleOCR-VL; needs cmake and a C++ "
                             "compiler, builds once, see scripts/llama_cpp_reference.py)")
    parser.add_argument("--llama-cpp-threads", type=int, default=os.cpu_count() or 2,
                        help="its CPU threads (default: the CPU count)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="run configurations even when they look too large for the free memory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch {args.batch!r}: a comma list of integers >= 1")
    if not args.batches or min(args.batches) < 1 or (args.worker and len(args.batches) != 1):
        parser.error(f"--batch {args.batch!r}: a comma list of integers >= 1")
    args.batch = args.batches[0]
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    return args


def _plan(args: argparse.Namespace, notes: list[str]) -> list[Config]:
    models = _choices(args.model, MODELS, "model")
    backends = _choices(args.backend, BACKENDS, "backend")
    dtypes = _choices(args.dtype, BENCH_DTYPES, "dtype")
    if args.checkpoint and len(models) != 1:
        raise SystemExit("bench.py: --checkpoint needs a single --model")
    have_ds_reference = bool(args.reference_code and args.reference_python)
    if set(models) & set(OFFICIAL_REFERENCE) and not args.no_reference and not have_ds_reference:
        print(REFERENCE_HELP, flush=True)
        notes.append("DeepSeek-OCR reference: skipped (no --reference-code/--reference-python)")
    configs = []
    for model in models:
        checkpoint = args.checkpoint or ensure_checkpoint(model)
        for dtype in dtypes:
            for batch in args.batches:
                configs += [Config(model, "ours", backend, dtype, checkpoint, batch) for backend in backends]
                official = model in OFFICIAL_REFERENCE
                if args.no_reference or (official and not have_ds_reference):
                    continue
                if official and batch > 1:
                    continue  # the official code's infer() decodes one image at a time
                name = "official+tf4.46" if official else "transformers"
                configs.append(Config(model, "reference", name, dtype, checkpoint, batch))
        if args.llama_cpp:
            if model not in llama_cpp_reference.MODELS:
                notes.append(f"llama.cpp: {model} not wired (only {', '.join(llama_cpp_reference.MODELS)})")
            elif 1 not in args.batches:
                notes.append(f"llama.cpp: {model} skipped (its CLI runs batch 1 only; add 1 to --batch)")
            else:
                configs += [Config(model, "llama.cpp", "llama.cpp", label, checkpoint)
                            for label in llama_cpp_reference.OUTTYPES.values()]
    if args.llama_cpp:
        notes.append(f"llama.cpp: llama-cpp-python {llama_cpp_reference.VERSION}'s vendored llama.cpp, "
                     f"{llama_cpp_reference.BINARY}, {args.llama_cpp_threads} threads, its own preprocessing; "
                     "vision = its encode of the image's chunks, prefill = its prompt eval less the encodes its "
                     "prompt-eval clock spans; load s = its start until the first encode (text model and "
                     "projector loaded); mmproj BF16 in both rows")
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    notes: list[str] = []
    configs = _plan(args, notes)
    info = platform_info()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for config in configs:  # sequential on purpose: one full-size model in memory at a time
            config.record = measure(config, args, Path(tmp) / f"{config.model}-inputs.npz")
            if config.impl == "reference" and "error" not in config.record:
                config.backend = config.record.get("name", config.backend)
    ratio_rows = ratios(configs)
    llama_rows = llama_cpp_ratios(configs) if args.llama_cpp else None
    notes.append(f"image {args.image.name}, {args.max_new_tokens} new tokens (EOS ignored), device {args.device}"
                 f"{', after a warm-up' if args.warmup else ''}; TTFT includes our preprocessing, the reference's "
                 "starts at generate() on our inputs")
    print(render(info, configs, ratio_rows, notes, llama_rows))
    if args.json:
        data = {"platform": info, "max_new_tokens": args.max_new_tokens, "image": str(args.image),
                "device": args.device, "warmup": args.warmup, "notes": notes, "ratios": ratio_rows,
                **({"llama_cpp_ratios": llama_rows} if args.llama_cpp else {}),
                "runs": [{**c.record, "model": c.model, "impl": c.impl, "backend": c.backend, "dtype": c.dtype,
                          "checkpoint": str(c.checkpoint)} for c in configs]}
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
