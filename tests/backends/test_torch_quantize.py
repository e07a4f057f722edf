"""torch_ocr.quantize: the int8/int4 kernels against the weight they stand for, what gets quantized in each
model family, how close the logits stay, converted snapshots (strict, equal to load-time quantization).

Mirrors test_mlx_quantize.py. Group size 32 is used where every decoder weight must be quantized: the tiny
DeepSeek experts are 32 wide. Token agreement is printed, not asserted (the tiny random models have near-tied
logits); the assertions are on the prefill logits.
"""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import CheckpointError, UserError
from torch_ocr import deepseek_ocr, deepseek_ocr2 as td2, glm_ocr as tg, paddleocr_vl as tp
from tests.backends.quant_inputs import prompt_inputs
from torch_ocr import quantize as q

STEPS = 8
MODULES = {"deepseek-ocr": deepseek_ocr, "paddleocr-vl": tp, "deepseek-ocr-2": td2, "glm-ocr": tg}
FIXTURES = {"deepseek-ocr": "deepseek_tiny", "paddleocr-vl": "paddle_tiny", "deepseek-ocr-2": "deepseek2_tiny",
            "glm-ocr": "glm_tiny"}
EOS = {"deepseek-ocr": (1,), "paddleocr-vl": (2,), "deepseek-ocr-2": (1,), "glm-ocr": (59246, 59253)}


# ----------------------------------------------------------------------------------------------- kernels

def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 32), (4, 64), (4, 128)])
def test_kernel_equals_the_dequantized_weight_in_float32(bits: int, group_size: int) -> None:
    # float32 scales and activations: the kernel must compute exactly x @ dequantize(w).T, summation order aside.
    w, x = _weight(48, 256), torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    tensors = q.quantize_weight(w, bits, group_size)
    weight, scales = q.pack(tensors, bits, group_size, torch.float32)
    out = q.quantized_matmul(x, weight, scales, bits, group_size)
    ref = x @ q.dequantize(tensors, bits, group_size).T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 32), (4, 128)])
def test_quantized_linear_runs_bfloat16_activations_with_bfloat16_rounding_only(bits: int, group_size: int) -> None:
    w, x = _weight(64, 512), torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(64) * 0.1
    tensors = q.quantize_weight(w, bits, group_size)
    layer = q.QuantizedLinear(tensors, bias, bits=bits, group_size=group_size, dtype=torch.float32)
    out = layer(x)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    ref = x.bfloat16().float() @ q.dequantize(tensors, bits, group_size).T + bias
    error = float((out - ref).abs().max() / ref.abs().max())
    assert error < 1e-2, error  # bfloat16 output rounding (2^-8 relative) and the int4 zero's rounding
    quant_error = float((x @ w.T + bias - ref).abs().max() / ref.abs().max())
    assert quant_error < (0.02 if bits == 8 else 0.2), quant_error  # what quantizing the weight itself costs


def test_scales_are_bfloat16_exact_so_the_kernel_cast_is_lossless() -> None:
    for bits in (8, 4):
        tensors = q.quantize_weight(_weight(16, 64), bits, 32)
        for name in ("scales", "biases")[: 1 if bits == 8 else 2]:
            torch.testing.assert_close(tensors[name].bfloat16().float(), tensors[name], rtol=0, atol=0)


def test_quantized_experts_run_each_expert_on_its_rows() -> None:
    stack = torch.stack([_weight(32, 64, seed=e) for e in range(4)])  # (E, N, K)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    ends = torch.tensor([2, 2, 6, 7], dtype=torch.int32)  # expert 1 has no rows
    for bits in (8, 4):
        tensors = q.quantize_weight(stack, bits, 32)
        experts = q.QuantizedExperts(tensors, bits=bits, group_size=32, dtype=torch.float32)
        out = deepseek_ocr.grouped_linear(x, experts, ends)
        starts = [0, 2, 2, 6]
        for e, (start, end) in enumerate(zip(starts, ends.tolist())):
            if end > start:
                w = q.dequantize({name: t[e] for name, t in tensors.items()}, bits, 32)
                ref = x[start:end].bfloat16().float() @ w.T
                torch.testing.assert_close(out[start:end], ref, rtol=2e-2, atol=2e-2)


def test_shapes_the_kernels_cannot_take_are_named() -> None:
    cpu = torch.device("cpu")
    assert q.unfit_reason((64, 36), 8, 64, cpu) == "input width 36 is not a multiple of 8"
    assert q.unfit_reason((64, 96), 4, 64, cpu) == "input width 96 is not a multiple of the group size 64"
    assert q.unfit_reason((40, 64), 4, 32, cpu) == "output width 40 is not a multiple of 16"
    assert q.unfit_reason((40, 64), 4, 32, torch.device("cuda")) is None
    assert q.unfit_reason((8, 64, 32), 4, 32, cpu) is None


# ----------------------------------------------------------------------------------------------- models

def _greedy(model, inputs, eos: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    cache = model.make_cache(1, len(inputs.input_ids) + STEPS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = logits.numpy().copy(), []
    for n in range(STEPS):
        token = int(logits.argmax(dim=-1).item())
        ids.append(token)
        if token in eos:
            break
        logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return first, ids


class Case:
    """One model kind: its module, snapshot, inputs and float32 reference, built once."""

    def __init__(self, kind: str, snapshot: Path) -> None:
        self.kind, self.snapshot, self.module = kind, snapshot, MODULES[kind]
        self.inputs = prompt_inputs(kind, snapshot)
        self.float = self.load()
        self.float_logits, self.float_ids = _greedy(self.float, self.inputs, EOS[kind])

    def load(self, snapshot: Path | None = None, **kwargs):
        snapshot = snapshot or self.snapshot
        return self.module.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module", params=list(MODULES))
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param, request.getfixturevalue(FIXTURES[request.param]))


def _quantized_paths(model: nn.Module) -> tuple[list[str], list[str]]:
    quantized, plain = [], []
    for path, module in model.named_modules():
        if isinstance(module, (q.QuantizedLinear, q.QuantizedExperts)):
            quantized.append(path)
        elif isinstance(module, nn.Linear):
            plain.append(path)
    plain += [name for name, p in model.named_parameters() if p.dim() == 3]  # float expert stacks
    return quantized, plain


def test_only_the_decoder_is_quantized(case: Case) -> None:
    model = case.load(quantize=8, group_size=32)
    quantized, plain = _quantized_paths(model)
    prefixes, vision = case.module.QUANTIZE_PREFIXES, case.module.VISION_PREFIXES
    assert quantized and all(p.startswith(prefixes) for p in quantized)
    assert not [p for p in plain if p.startswith(prefixes)], "every decoder weight is 8-divisible here"
    assert any(p.startswith("lm_head") for p in quantized) and model.dtype == torch.float32
    assert any(p.startswith(vision) for p in plain), "the towers stay float"
    tower = [m for p, m in model.named_modules() if p.startswith(vision) and isinstance(m, nn.Linear)]
    assert tower and all(m.weight.dtype == torch.float32 for m in tower)
    if case.kind.startswith("deepseek"):
        assert any(p.endswith("mlp.experts.down_proj") for p in quantized)
        assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float
    with_vision, _ = _quantized_paths(case.load(quantize=8, group_size=32, quantize_vision=True))
    assert any(p.startswith(vision) for p in with_vision)


def test_group_64_keeps_too_narrow_weights_float(case: Case) -> None:
    model = case.load(quantize=4, group_size=64)
    quantized, plain = _quantized_paths(model)
    assert quantized
    narrow = [p for p in plain if p.startswith(case.module.QUANTIZE_PREFIXES)]
    shapes = {**{p: m.weight.shape for p, m in model.named_modules() if isinstance(m, nn.Linear)},
              **{n: t.shape for n, t in model.named_parameters() if t.dim() == 3}}
    for path in narrow:
        assert shapes[path][-1] % 64 != 0, path
    if case.kind.startswith("deepseek"):
        assert narrow, "the tiny experts' down_proj (32 wide) stays float at group 64"


def test_each_float_weight_is_freed_as_it_is_quantized(case: Case) -> None:
    model = case.load()
    head = weakref.ref(model.lm_head.weight)
    q.quantize_model(model, bits=8, group_size=32, prefixes=case.module.QUANTIZE_PREFIXES)
    gc.collect()
    assert head() is None, "the float lm_head weight is still referenced"


# 4-bit steps are 16x the 8-bit ones and the tiny random decoders amplify them unevenly: the 4-bit bound only
# says the logits still follow the float ones (scripts/quant_drift.py measures the next-token distributions).
@pytest.mark.parametrize("bits, max_error, min_corr", [(8, 0.05, 0.999), (4, 1.0, 0.65)])
@pytest.mark.slow
def test_quantized_logits_stay_close(case: Case, bits: int, max_error: float, min_corr: float) -> None:
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
    assert after < before  # the embedding table, float on torch, dominates the tiny models


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.slow
def test_converted_snapshot_equals_load_time_quantization(case: Case, tmp_path: Path, bits: int) -> None:
    out = tmp_path / f"q{bits}"
    sizes = q.convert(case.snapshot, out, bits=bits, group_size=32, dtype="float32")
    assert sizes["after"] < sizes["before"]
    marker = json.loads((out / "config.json").read_text())[q.MARKER_KEY]
    assert marker == {"bits": bits, "group_size": 32, "mode": "symmetric" if bits == 8 else "affine",
                      "format": "torch"}
    copied = {p.name for p in case.snapshot.iterdir() if p.is_file()} - {"config.json", ".complete"}
    copied = {n for n in copied if not n.endswith((".safetensors", ".safetensors.index.json"))}
    assert copied and copied <= {p.name for p in out.iterdir()}  # tokenizer, preprocessor, generation configs
    converted = case.load(out)
    direct = case.load(quantize=bits, group_size=32)
    assert _quantized_paths(converted)[0] == _quantized_paths(direct)[0]
    a, ids_a = _greedy(converted, case.inputs, EOS[case.kind])
    b, ids_b = _greedy(direct, case.inputs, EOS[case.kind])
    np.testing.assert_array_equal(a, b)
    assert ids_a == ids_b
    with pytest.raises(UserError, match="already a quantized snapshot"):
        q.convert(out, tmp_path / "again", bits=bits, group_size=32)


def test_a_converted_snapshot_loads_strictly(case: Case, tmp_path: Path) -> None:
    if case.kind != "deepseek-ocr":
        pytest.skip("one model is enough: the check is the loader's, shared by all")
    out = tmp_path / "q8"
    q.convert(case.snapshot, out, bits=8, group_size=32, dtype="float32")
    tensors = load_file(str(out / "model.safetensors"))
    expert = "model.layers.1.mlp.experts.down_proj"

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for path in out.iterdir():
            if path.name != "model.safetensors":
                (folder / path.name).write_bytes(path.read_bytes())
        save_file(edit(dict(tensors)), str(folder / "model.safetensors"))
        return folder

    missing = broken("missing", lambda t: {k: v for k, v in t.items() if k != f"{expert}.weight"})
    extra = broken("extra", lambda t: {**t, "model.layers.0.mlp.up_proj.biases": torch.zeros(2)})
    shape = broken("shape", lambda t: {**t, f"{expert}.scales": t[f"{expert}.scales"][:, :-1].contiguous()})
    kind = broken("kind", lambda t: {**t, f"{expert}.weight": t[f"{expert}.weight"].to(torch.uint8)})
    for folder, text in ((missing, f"missing tensors: {expert}.weight"),
                         (extra, "unexpected tensors: model.layers.0.mlp.up_proj.biases"),
                         (shape, f"shape mismatches: {expert}.scales"),
                         (kind, f"wrong weight types: {expert}.weight")):
        with pytest.raises(CheckpointError, match=text.replace(".", r"\.")) as error:
            case.load(folder)
        assert "\n" not in str(error.value)
    bits = json.loads((out / "config.json").read_text())
    bits[q.MARKER_KEY]["bits"] = 4  # an 8-bit file declared 4-bit: every quantized weight is misshapen
    wrong = broken("bits", lambda t: t)
    (wrong / "config.json").write_text(json.dumps(bits))
    with pytest.raises(CheckpointError, match="shape mismatches: .*weight: checkpoint"):
        case.load(wrong)


def test_bad_options_are_one_line_user_errors(case: Case) -> None:
    for kwargs, text in (({"quantize": 3}, "4 or 8, got 3"), ({"quantize": 4, "group_size": 48}, "group size")):
        with pytest.raises(UserError, match=text) as error:
            case.load(**kwargs)
        assert "\n" not in str(error.value)
