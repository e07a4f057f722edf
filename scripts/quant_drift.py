"""How far 8-bit and 4-bit weights move the next-token distribution from bfloat16, on torch and on MLX.

    python scripts/quant_drift.py                                  # tiny DeepSeek-OCR, both backends
    python scripts/quant_drift.py --model paddleocr-vl --size full --tokens 64
    python scripts/quant_drift.py --model glm-ocr --model-dir SNAPSHOT --backends torch

One page goes through the pipeline's own preparation. Per backend, the bfloat16 model decodes it greedily (EOS
ignored), which gives the reference tokens and the reference next-token distribution at every position (the
prefill's last one, then each step). Each quantized model (`--quantize 8` and `4`, the same weights, loaded the
way the CLI loads them) is then fed THE SAME tokens (teacher forcing, so a first disagreement does not derail
the rest) and compared position by position: the mean and largest KL(bf16 || quantized) in nats, and the top-1
agreement. Each backend is held against its own bfloat16 run, so the numbers are its quantization's alone.

Snapshots: the tiny one by default (built into a temporary folder in seconds; its random weights have flat,
near-tied distributions, so it checks that the script runs, not what quantization costs); `--size full` the
full-size random one scripts/bench.py builds and caches (real dimensions, still random weights: top-1 flips are
more frequent than with the real model, a pessimistic bound); `--model-dir` any snapshot, e.g. the real one.
A run a framework cannot do is reported as failed and the rest goes on: MLX on the CPU has no bfloat16
`gather_mm`, so a DeepSeek model whose experts are partly left float (tiny ones at group size 64) fails there.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("deepseek-ocr", "paddleocr-vl", "paddleocr-vl-1.5", "deepseek-ocr-2", "glm-ocr")
DEFAULT_IMAGE = ROOT / "tests" / "data" / "page.png"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _torch_logprobs(model: Any, inputs: Any, tokens: list[int] | None, count: int) -> tuple[list[int], np.ndarray]:
    """(tokens fed, (count, vocab) float32 log-probabilities): greedy when `tokens` is None, else teacher-forced."""
    import torch  # noqa: PLC0415

    cache = model.make_cache(1, len(inputs.input_ids) + count)
    with torch.inference_mode():
        logits = model.prefill(inputs, model.encode_images(inputs), cache)
        fed, rows = [], []
        for n in range(count):
            rows.append(_log_softmax(logits.float().numpy()[0]))
            token = int(rows[-1].argmax()) if tokens is None else tokens[n]
            fed.append(token)
            if n + 1 < count:
                logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return fed, np.stack(rows)


def _mlx_logprobs(model: Any, inputs: Any, tokens: list[int] | None, count: int) -> tuple[list[int], np.ndarray]:
    """`_torch_logprobs` on MLX."""
    import mlx.core as mx  # noqa: PLC0415

    cache = model.make_cache(1, len(inputs.input_ids) + count)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    fed, rows = [], []
    for n in range(count):
        rows.append(_log_softmax(np.array(logits.astype(mx.float32))[0]))
        token = int(rows[-1].argmax()) if tokens is None else tokens[n]
        fed.append(token)
        if n + 1 < count:
            logits = model.step(mx.array([token]), mx.array([inputs.next_position + n]), cache)
    return fed, np.stack(rows)


LOGPROBS = {"torch": _torch_logprobs, "mlx": _mlx_logprobs}


def _run(args: argparse.Namespace, snapshot: Path, backend: str, bits: int | None,
         tokens: list[int] | None) -> tuple[list[int], np.ndarray, int]:
    """One model (bfloat16, or quantized to `bits`) through the pipeline's loading: fed tokens, log-probs, bytes."""
    from common.config import load_settings  # noqa: PLC0415
    from common.images import open_image  # noqa: PLC0415
    from common.pipeline import Pipeline, Request  # noqa: PLC0415
    from common.prompts import DEFAULT_PROMPTS  # noqa: PLC0415

    flags = {"model": args.model, "model_dir": str(snapshot), "backend": backend, "device": "cpu",
             "dtype": "bfloat16", "quantize": bits, "quantize_group_size": args.group_size}
    if args.model == "deepseek-ocr" and args.size == "tiny" and not args.model_dir:
        flags["mode"] = "tiny"  # the tiny towers' position tables are sized for it
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.toml").touch()  # an empty config.toml: the built-in defaults
        settings = load_settings(Path(tmp) / "config.toml", flags)
    pipeline = Pipeline(settings)
    prepared = pipeline.prepare(Request(DEFAULT_PROMPTS[args.model], [open_image(str(args.image))],
                                        model=args.model))
    model = prepared.resident.model.model
    fed, logprobs = LOGPROBS[backend](model, prepared.inputs, tokens, args.tokens)
    size = _weight_bytes(backend, model)
    del model, prepared, pipeline
    gc.collect()
    return fed, logprobs, size


def _weight_bytes(backend: str, model: Any) -> int:
    if backend == "torch":
        from torch_ocr.quantize import weight_bytes  # noqa: PLC0415
    else:
        from mlx_ocr.quantize import weight_bytes  # noqa: PLC0415
    return weight_bytes(model)


def drift(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Per-position KL(reference || other) in nats (mean and max) and top-1 agreement of two log-prob arrays."""
    kl = (np.exp(reference) * (reference - other)).sum(axis=-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((reference.argmax(-1) == other.argmax(-1)).mean())}


def _snapshot(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model_dir:
        return args.model_dir
    if args.size == "full":
        from scripts.bench import ensure_checkpoint  # noqa: PLC0415 - builds once into the user cache

        return ensure_checkpoint(args.model)
    from scripts.make_checkpoint import BUILDERS  # noqa: PLC0415

    out = tmp / f"{args.model}-tiny"
    BUILDERS[args.model](out, size="tiny", seed=args.seed, dtype="float32")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deepseek-ocr", choices=MODELS)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--model-dir", type=Path, help="a snapshot instead of a random one")
    parser.add_argument("--backends", default="torch,mlx", help="comma-separated: torch, mlx (skipped if absent)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--tokens", type=int, default=32, help="positions compared (prefill's last, then steps)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = _snapshot(args, Path(tmp))
        for backend in backends:
            if importlib.util.find_spec(backend) is None:
                print(f"{backend}: not installed, skipped")
                continue
            tokens, reference, size = _run(args, snapshot, backend, None, None)
            rows.append((backend, "bf16", size, {"kl_mean": 0.0, "kl_max": 0.0, "top1": 1.0}))
            for bits in (8, 4):
                try:
                    _, logprobs, qsize = _run(args, snapshot, backend, bits, tokens)
                except RuntimeError as exc:  # a framework kernel missing for this dtype/device: say so, go on
                    rows.append((backend, f"int{bits}", 0, f"failed: {str(exc).splitlines()[0]}"))
                    continue
                rows.append((backend, f"int{bits}", qsize, drift(reference, logprobs)))
            print(f"{backend}: done", flush=True)
    source = args.model_dir or f"{args.size} random snapshot"
    print(f"\n{args.model} ({source}), one page, {args.tokens} teacher-forced positions, group size "
          f"{args.group_size} (torch 8-bit: per channel), load {os.getloadavg()[0]:.2f}")
    print(f"{'backend':<8}{'weights':>8}{'MiB':>10}{'mean KL':>12}{'max KL':>12}{'top-1':>9}")
    for backend, label, size, d in rows:
        if isinstance(d, str):
            print(f"{backend:<8}{label:>8}{'':>10}  {d}")
            continue
        print(f"{backend:<8}{label:>8}{size / 2**20:>10.1f}{d['kl_mean']:>12.2e}{d['kl_max']:>12.2e}{d['top1']:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
