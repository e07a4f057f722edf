"""mlx_ocr.quantize on both tiny checkpoints: what gets quantized, how close it stays, converted snapshots.

Token agreement with the float model is printed, not asserted: the tiny random-weight models have top-2 logit
gaps of a few percent, so even 8-bit noise flips some greedy tokens (measured: 8-bit group 32 kept 16/16 ids
on both models, group 64 1/16 on PaddleOCR-VL). The assertions are on the prefill logits, which are stable.
Group size 32 is used where every decoder layer must be quantized: the tiny DeepSeek experts are 32 wide.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear  # noqa: E402

from common import deepseek_ocr as cd  # noqa: E402
from common import paddleocr_vl as pv  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import deepseek_ocr as md  # noqa: E402
from mlx_ocr import paddleocr_vl as mp  # noqa: E402
from mlx_ocr import quantize as q  # noqa: E402
from tests.goldens.deepseek_ocr.patterns import make_image  # noqa: E402

pytestmark = pytest.mark.mlx

STEPS = 12
EOS = {"deepseek-ocr": (1,), "paddleocr-vl": (2,)}


def _inputs(kind: str, snapshot: Path):
    image = make_image("rgb", 300, 200, 1)
    if kind == "deepseek-ocr":
        tok = Tokenizer.from_files(snapshot / "tokenizer.json", snapshot / "tokenizer_config.json")
        return cd.build_inputs("<image>\nFree OCR.", [image], tok, base_size=512, image_size=512, crop_mode=False)
    tok = Tokenizer.from_files(snapshot / "tokenizer.json")
    pre = json.loads((snapshot / "preprocessor_config.json").read_text())
    return pv.build_inputs("OCR:", [image], tok, pv.load_chat_template(snapshot), pre)


def _greedy(model, inputs, eos: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    cache = model.make_cache(1, len(inputs.input_ids) + STEPS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = np.array(logits), []
    for n in range(STEPS):
        token = int(mx.argmax(logits, axis=-1).item())
        ids.append(token)
        if token in eos:
            break
        logits = model.step(mx.array([token]), mx.array([inputs.next_position + n]), cache)
    return first, ids


class Case:
    """One model kind: its module, snapshot, inputs and float32 reference, built once."""

    def __init__(self, kind: str, snapshot: Path) -> None:
        mx.set_default_device(mx.cpu)
        self.kind, self.snapshot = kind, snapshot
        self.module = md if kind == "deepseek-ocr" else mp
        self.inputs = _inputs(kind, snapshot)
        self.float = self.load()
        self.float_logits, self.float_ids = _greedy(self.float, self.inputs, EOS[kind])

    def load(self, **kwargs):
        return self.module.load(self.snapshot / "config.json", self.snapshot, dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module", params=["deepseek-ocr", "paddleocr-vl"])
def case(request, deepseek_tiny: Path, paddle_tiny: Path) -> Case:
    return Case(request.param, deepseek_tiny if request.param == "deepseek-ocr" else paddle_tiny)


def _quantized_paths(model) -> tuple[list[str], list[str]]:
    quantized, plain = [], []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            quantized.append(path)
        elif isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)):
            plain.append(path)
    return quantized, plain


@pytest.mark.slow
def test_only_the_decoder_is_quantized(case: Case) -> None:
    model = case.load(quantize=8, group_size=32)
    quantized, plain = _quantized_paths(model)
    prefixes = case.module.QUANTIZE_PREFIXES
    assert quantized and all(p.startswith(prefixes) for p in quantized)
    assert all(not p.startswith(prefixes) for p in plain), "every decoder linear is 32-divisible in the tiny models"
    assert any(p.startswith("lm_head") for p in quantized)
    if case.kind == "deepseek-ocr":
        assert any(p.endswith("mlp.experts.down_proj") for p in quantized)
        gate = model.model.layers[1].mlp.gate.weight
        assert gate.dtype == mx.float32  # the router stays float


def test_group_64_keeps_too_narrow_layers_float(case: Case) -> None:
    model = case.load(quantize=4, group_size=64)
    quantized, plain = _quantized_paths(model)
    assert quantized
    narrow = [p for p in plain if p.startswith(case.module.QUANTIZE_PREFIXES)]
    for path in narrow:
        module = dict(model.named_modules())[path]
        assert module.weight.shape[-1] % 64 != 0, path


@pytest.mark.parametrize("bits, max_error, min_corr", [(8, 0.05, 0.999), (4, 0.5, 0.9)])
@pytest.mark.slow
def test_quantized_logits_stay_close_and_report_agreement(case: Case, bits: int, max_error: float,
                                                          min_corr: float) -> None:
    model = case.load(quantize=bits, group_size=32)
    logits, ids = _greedy(model, case.inputs, EOS[case.kind])
    ref = case.float_logits
    error = float(np.abs(logits - ref).max() / np.abs(ref).max())
    corr = float(np.corrcoef(logits.ravel(), ref.ravel())[0, 1])
    agree = sum(a == b for a, b in zip(ids, case.float_ids)) / len(case.float_ids)
    before, after = q.weight_bytes(case.float), q.weight_bytes(model)
    print(f"\n{case.kind} {bits}-bit g32: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
          f"prefill max err {error:.3%} of max |logit|, corr {corr:.5f}, greedy ids agree {agree:.0%}")
    assert error < max_error and corr > min_corr
    assert after < before * (0.5 if bits == 8 else 0.35)


@pytest.mark.slow
def test_converted_snapshot_round_trips(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "q4"
    sizes = q.convert(case.snapshot, out, bits=4, group_size=32, dtype="float32")
    print(f"\n{case.kind} convert 4-bit g32: {sizes['before'] / 2**20:.1f} MiB -> {sizes['after'] / 2**20:.1f} MiB")
    config = json.loads((out / "config.json").read_text())
    assert config[q.MARKER_KEY] == {"bits": 4, "group_size": 32, "mode": "affine", "format": "mlx"}
    copied = {p.name for p in case.snapshot.iterdir()} - {"config.json", ".complete"}
    copied = {n for n in copied if not n.endswith((".safetensors", ".safetensors.index.json"))}
    assert copied and copied <= {p.name for p in out.iterdir()}  # tokenizer, preprocessor, generation configs
    assert not list(out.glob("*.index.json"))
    # Loading must skip sanitize (a second conv transpose would fail the strict shape check) and equal
    # load-time quantization exactly.
    converted = case.module.load(out / "config.json", out, dtype="float32", device="cpu")
    direct = case.load(quantize=4, group_size=32)
    a, ids_a = _greedy(converted, case.inputs, EOS[case.kind])
    b, ids_b = _greedy(direct, case.inputs, EOS[case.kind])
    np.testing.assert_array_equal(a, b)
    assert ids_a == ids_b
    with pytest.raises(UserError, match="already a quantized snapshot"):
        q.convert(out, tmp_path / "again", bits=4, group_size=32)


def test_bad_options_are_user_errors(case: Case) -> None:
    with pytest.raises(UserError, match="4 or 8"):
        case.load(quantize=3)
    with pytest.raises(UserError, match="group size"):
        case.load(quantize=4, group_size=48)


def test_vision_quantized_only_when_asked(case: Case) -> None:
    model = case.load(quantize=8, group_size=32, quantize_vision=True)
    quantized, _ = _quantized_paths(model)
    vision = [p for p in quantized if p.startswith(case.module.VISION_PREFIXES)]
    assert vision, "the towers' linears are quantized with quantize_vision"
    logits, _ = _greedy(model, case.inputs, EOS[case.kind])
    corr = float(np.corrcoef(logits.ravel(), case.float_logits.ravel())[0, 1])
    print(f"\n{case.kind} 8-bit g32 with vision: {q.weight_bytes(model) / 2**20:.1f} MiB, corr {corr:.5f}")
    assert corr > 0.99
