"""DeepSeek-OCR-2 on MLX against the PyTorch backend, on the tiny real-layout checkpoint (float32, MLX on CPU).

The torch backend is held to transformers 5.23 by `test_deepseek_ocr2_torch.py`; here the MLX model must give the
same image embeddings, prefill logits (1e-4 relative to the largest logit) and greedy ids over untiled, tiled and
two-image prompts and a text-only one, the same Qwen2 encoder outputs, and load strictly (a missing, unexpected or
misshaped tensor named in the error, both banks of learned queries required).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

from safetensors.numpy import load_file, save_file  # noqa: E402

from common import deepseek_ocr2 as d2  # noqa: E402
from common.errors import CheckpointError  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import deepseek_ocr2 as md  # noqa: E402
from torch_ocr import deepseek_ocr2 as td  # noqa: E402

pytestmark = pytest.mark.mlx

EOS = 1
NEW_TOKENS = 8
RTOL = 1e-4


class Env:
    def __init__(self, snapshot: Path) -> None:
        mx.set_default_device(mx.cpu)
        self.torch = td.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.mlx = md.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")


@pytest.fixture(scope="module")
def env(deepseek2_tiny: Path) -> Env:
    return Env(deepseek2_tiny)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()), err_msg=what)


def _greedy(model, step_ids, inputs: d2.DeepseekOCRInputs) -> tuple[np.ndarray, list[int]]:
    cache = model.make_cache(1, len(inputs.input_ids) + NEW_TOKENS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = np.array(logits.tolist(), dtype=np.float32), []
    for n in range(NEW_TOKENS):
        token = int(np.argmax(np.array(logits.tolist())))
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(step_ids([token]), step_ids([inputs.next_position + n]), cache)
    return first, ids


CASES = {
    "untiled": ("<image>\n<|grounding|>Convert the document to markdown.", [(300, 200, 1)]),
    "tiled": ("<image>\nFree OCR.", [(1536, 700, 2)]),
    "two_images": ("<image>\n<image>\nLocate <|ref|>the title<|/ref|> in the image.", [(90, 60, 3), (64, 64, 4)]),
    "text_only": ("Describe a table.", []),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_logits_and_greedy_ids_equal_torch(env: Env, name: str) -> None:
    prompt, sizes = CASES[name]
    inputs = d2.build_inputs(prompt, [_image(*s) for s in sizes], env.tokenizer)
    ref_logits, ref_ids = _greedy(env.torch, torch.tensor, inputs)
    logits, ids = _greedy(env.mlx, mx.array, inputs)
    _close(logits, ref_logits, name)
    assert ids == ref_ids, name
    assert ids[0] != EOS


def test_image_embeddings_and_encoder_equal_torch(env: Env) -> None:
    inputs = d2.build_inputs("<image>\nFree OCR.", [_image(1536, 700, 5)], env.tokenizer)
    assert inputs.images[0].crop == (2, 1)
    ref = env.torch.encode_images(inputs).numpy()
    _close(np.array(env.mlx.encode_images(inputs).tolist()), ref, "embeddings")
    batched = env.mlx.encode_images_batch([inputs, d2.build_inputs("<image>\nx", [_image(80, 50, 6)], env.tokenizer)])
    _close(np.array(batched[0].tolist()), ref, "batched embeddings")
    # The encoder alone, on the same SAM features, for both view sizes (both query banks).
    for n in (12, 16):
        sam = np.random.default_rng(n).standard_normal((1, n, n, env.torch.config.encoder.hidden_size), np.float32)
        with torch.no_grad():
            want = env.torch.model.qwen2_model(torch.from_numpy(sam).permute(0, 3, 1, 2)).numpy()
        _close(np.array(env.mlx.model.qwen2_model(mx.array(sam)).tolist()), want, f"encoder {n}x{n}")


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    (shard,) = src.glob("*.safetensors")
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(dst / shard.name))
    return dst


def test_strict_load_names_missing_unexpected_and_misshaped(deepseek2_tiny: Path, tmp_path: Path) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        del t["model.qwen2_model.query_768.weight"]
        t["model.image_newline"] = np.zeros(64, np.float32)  # DeepSeek-OCR's, not OCR-2's
        t["model.qwen2_model.model.model.norm.weight"] = np.zeros(5, np.float32)

    snapshot = _copy_with(deepseek2_tiny, tmp_path / "edited", edit)
    for load in (md.load, td.load):
        with pytest.raises(CheckpointError) as err:
            load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        message = str(err.value)
        assert "model.qwen2_model.query_768.weight" in message and "model.image_newline" in message
        assert "model.qwen2_model.model.model.norm.weight" in message
