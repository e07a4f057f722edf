"""Weight-only quantization for the torch backend: at load time (`--quantize 4|8`) and as a converted snapshot.

Mirrors mlx_ocr/quantize.py (same names, same order). Only the decoder is quantized by default: its Linear layers
(attention, MLPs, shared experts, the head) and the routed experts' stacked (E, N, K) weights. The vision towers
and projectors stay float unless asked, and so does the MoE router (a plain weight: routing decides which
experts run at all). Unlike MLX the token embedding stays float too: torch has no native quantized lookup, and a
lookup reads only the rows asked for, so the table costs memory, not decode bandwidth.

The kernels are torch's own. 8 bits: symmetric, one scale per output channel (`_weight_int8pack_mm`, CPU and
CUDA); the kernel has no groups, so the group size applies to 4 bits only. 4 bits: affine per group of
`group_size` input weights, w = q * scale + bias with q in 0..15 as in MLX's affine mode
(`_weight_int4pack_mm_for_cpu`, or tinygemm's `_weight_int4pack_mm` on CUDA; both compute (q - 8) * scale + zero,
so zero = bias + 8 * scale). On the CPU activations enter both kernels in bfloat16 whatever the model dtype:
measured on a 2-core AVX-512 CPU they are vectorised for bfloat16 only, and in float32 ran 7-30x slower than the
float32 linear. Scales are rounded to bfloat16 before the weights are rounded against them, so that cast loses
nothing. A weight whose shape a kernel cannot take stays float, logged: int8 needs K % 8 (the CPU kernel crashed
the process with bfloat16 activations and K % 4 != 0), int4 K % group_size and N % 16 (CPU) or N % 8 (CUDA).

A converted snapshot (`"format": "torch"` in the config.json marker, see common/quantization.py) keeps the torch
module names; per quantized path P it holds `P.weight` (int8 (N, K), or uint8 (N, K/2): two 4-bit values per
byte, the even column in the high nibble, the CUDA packer's input), `P.scales` ((N,) or (N, K/G)), `P.biases`
((N, K/G), 4 bits) and `P.bias` when the Linear has one; routed experts the same with a leading E. The kernels'
own layouts are device-specific, so they are packed at load from these. The MLX snapshot cannot be shared: its
8 bits are affine per group, which the int8 kernel (one symmetric scale per row) cannot run without quantizing
twice (lossy, so no longer equal to load-time quantization), and its tensors are in MLX module layout
(convolutions channels-last, experts as three switch stacks, quantized embeddings). The 4-bit names and
meaning (`weight`, `scales`, `biases`) are MLX's; only the packing differs.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from common.checkpoints import check_strict
from common.errors import CheckpointError, UserError
from common.models import get_family
from common.quantization import MARKER_KEY  # noqa: F401 - re-exported: the marker's key in config.json
from common.quantization import (check_options, copy_snapshot_files, kind_of, prepare_output,
                                 write_config)
from common.quantization import read_config as _read_config

log = logging.getLogger(__name__)

FORMAT = "torch"  # the marker's `format`: this backend's layout
INT8_MAX = 127
INT4_MAX = 15
INT4_ZERO = 8  # the int4 kernels subtract 8 from every 4-bit value
INT8_K_MULTIPLE = 8
INT4_N_MULTIPLE = {"cpu": 16, "cuda": 8}
# The packed scale dtype: bfloat16 except int8 on CUDA, whose kernel casts to float32 itself.
KERNEL_DTYPE = torch.bfloat16
#: The snapshot tensors of one quantized weight, per bit width.
SNAPSHOT_NAMES = {8: ("weight", "scales"), 4: ("weight", "scales", "biases")}


def read_config(config_path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json without the marker, and the marker; an MLX-quantized snapshot is a `UserError`."""
    return _read_config(config_path, backend=FORMAT)


# ----------------------------------------------------------------------------------------------- kernels

def unfit_reason(shape: torch.Size | tuple[int, ...], bits: int, group_size: int, device: torch.device) -> str | None:
    """Why a (..., N, K) weight cannot be quantized for `device`'s kernel, or None when it can."""
    n, k = shape[-2], shape[-1]
    if bits == 8:
        return None if k % INT8_K_MULTIPLE == 0 else f"input width {k} is not a multiple of {INT8_K_MULTIPLE}"
    if k % group_size:
        return f"input width {k} is not a multiple of the group size {group_size}"
    n_multiple = INT4_N_MULTIPLE.get(device.type)
    if n_multiple is None:
        return f"no int4 kernel on {device.type}"
    return None if n % n_multiple == 0 else f"output width {n} is not a multiple of {n_multiple}"


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """(..., N, K) float weight -> the snapshot tensors `weight`, `scales` (and `biases` for 4 bits), scales and
    biases in the weight's dtype. Computed in float32 one matrix at a time (an expert stack's temporaries stay
    one expert's size)."""
    if weight.dim() == 3:
        parts = [quantize_weight(matrix, bits, group_size) for matrix in weight]
        return {name: torch.stack([part[name] for part in parts]) for name in parts[0]}
    w = weight.float()
    tiny = torch.finfo(KERNEL_DTYPE).tiny
    if bits == 8:
        scales = (w.abs().amax(dim=-1) / INT8_MAX).clamp(min=tiny).to(KERNEL_DTYPE).float()
        q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return {"weight": q, "scales": scales.to(weight.dtype)}
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / INT4_MAX).clamp(min=tiny).to(KERNEL_DTYPE).float()
    biases = low.to(KERNEL_DTYPE).float()
    q = torch.round((groups - biases[..., None]) / scales[..., None]).clamp(0, INT4_MAX).to(torch.uint8).view(n, k)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    return {"weight": packed, "scales": scales.to(weight.dtype), "biases": biases.to(weight.dtype)}


def dequantize(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight that snapshot tensors of one matrix stand for (the tests' and drift script's
    reference)."""
    scales = tensors["scales"].float()
    if bits == 8:
        return tensors["weight"].float() * scales[:, None]
    packed = tensors["weight"]
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2).float()  # (N, K)
    n, k = q.shape
    w = q.view(n, k // group_size, group_size) * scales[..., None] + tensors["biases"].float()[..., None]
    return w.view(n, k)


def pack(tensors: dict[str, torch.Tensor], bits: int, group_size: int,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Snapshot tensors of one (N, K) matrix -> (kernel weight, kernel scales) on their device, scales in `dtype`.

    int8: the (N, K) weight and (N,) scales as they are. int4: the device's packed layout, and the (K/G, N, 2)
    scale-and-zero table both int4 kernels read.
    """
    weight, scales = tensors["weight"], tensors["scales"]
    if bits == 8:
        return weight.contiguous(), scales.to(dtype).contiguous()
    zeros = tensors["biases"].float() + INT4_ZERO * scales.float()
    table = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()
    k = 2 * weight.shape[-1]
    if weight.device.type == "cuda":
        inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(weight.contiguous(), inner_k_tiles), table
    q = torch.stack([weight >> 4, weight & 0xF], dim=-1).flatten(-2).to(torch.int32)  # the CPU packer wants (N, K)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), table


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int,
                     group_size: int) -> torch.Tensor:
    """x (..., K) times a packed weight's transpose -> (..., N) in x's dtype; x enters the kernel in scales' dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(scales.dtype).contiguous()  # the kernels take 2-D, row-contiguous input
    if bits == 8:
        out = torch.ops.aten._weight_int8pack_mm(rows, weight, scales)
    elif rows.device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(rows, weight, group_size, scales)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def _kernel_dtype(bits: int, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return dtype if bits == 8 and device.type == "cuda" else KERNEL_DTYPE


class QuantizedLinear(nn.Module):
    """`layers.Linear` with an int8 or int4 weight: the same call, (..., K) -> (..., N) in the input's dtype.

    The packed buffers are not persistent: they are device-specific, and snapshots store `quantize_weight`'s
    portable tensors instead. `dtype` is the float dtype of the model around it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, *, bits: int, group_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        weight, scales = pack(tensors, bits, group_size, _kernel_dtype(bits, tensors["weight"].device, dtype))
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_matmul(x, self.weight, self.scales, self.bits, self.group_size)
        return out if self.bias is None else out + self.bias


class QuantizedExperts(nn.Module):
    """A layer's routed experts (E, N, K), each quantized on its own; `grouped_linear` calls it with the rows sorted
    by expert. One quantized matmul per expert that has rows (the group ends are read on the host)."""

    def __init__(self, tensors: dict[str, torch.Tensor], *, bits: int, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        kernel_dtype = _kernel_dtype(bits, tensors["weight"].device, dtype)
        packed = [pack({name: t[e] for name, t in tensors.items()}, bits, group_size, kernel_dtype)
                  for e in range(tensors["weight"].shape[0])]
        self.out_features = tensors["scales"].shape[1]
        self.register_buffer("weight", torch.stack([w for w, _ in packed]), persistent=False)
        self.register_buffer("scales", torch.stack([s for _, s in packed]), persistent=False)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """x (M, K) sorted by expert, expert g's rows ends[g-1]:ends[g] -> (M, N)."""
        out = x.new_empty(x.shape[0], self.out_features)
        start = 0
        for g, end in enumerate(ends.tolist()):
            if end > start:
                out[start:end] = quantized_matmul(x[start:end], self.weight[g], self.scales[g], self.bits,
                                                  self.group_size)
            start = end
        return out


# ----------------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class _Target:
    path: str     # the quantized tensors' prefix: a Linear's module path, or an expert stack's parameter name
    owner: nn.Module
    name: str     # attribute of `owner` replaced by the quantized module
    stacked: bool  # a routed-expert stack (a 3-D parameter), not a Linear

    @property
    def weight_name(self) -> str:
        """The float weight's state-dict name."""
        return self.path if self.stacked else f"{self.path}.weight"


def _targets(model: nn.Module, prefixes: tuple[str, ...]) -> list[_Target]:
    """Every weight under `prefixes` quantization may replace: Linear modules, and the 3-D parameters, which in
    these models are only the routed experts' stacks."""
    found = []
    for path, module in model.named_modules():
        dot = f"{path}." if path else ""
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and f"{dot}{name}".startswith(prefixes):
                found.append(_Target(f"{dot}{name}", module, name, stacked=False))
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and f"{dot}{name}".startswith(prefixes):
                found.append(_Target(f"{dot}{name}", module, name, stacked=True))
    return found


def _replace(target: _Target, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, *, bits: int,
             group_size: int, dtype: torch.dtype) -> None:
    """Put the quantized module in place of the float weight, which then has no reference left."""
    module: nn.Module
    if target.stacked:
        module = QuantizedExperts(tensors, bits=bits, group_size=group_size, dtype=dtype)
    else:
        module = QuantizedLinear(tensors, bias, bits=bits, group_size=group_size, dtype=dtype)
    delattr(target.owner, target.name)
    setattr(target.owner, target.name, module)


def quantize_model(model: nn.Module, *, bits: int, group_size: int = 64, prefixes: tuple[str, ...],
                   collect: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Quantize, in place, every Linear and expert stack under `prefixes`; returns their paths.

    Each float weight is freed as its quantized module replaces it, so memory never holds both models. A weight
    whose shape the kernel cannot take stays float (one log line names them). `collect`, when given, receives
    the snapshot tensors of every quantized path (what `convert` writes).
    """
    check_options(bits, group_size)
    chosen, kept = [], []
    for target in _targets(model, prefixes):
        current = getattr(target.owner, target.name)
        weight = current if target.stacked else current.weight
        reason = unfit_reason(weight.shape, bits, group_size, weight.device)
        if reason:
            kept.append(f"{target.path} ({reason})")
            continue
        bias = None if target.stacked else current.bias
        tensors = quantize_weight(weight.detach(), bits, group_size)
        if collect is not None:
            collect.update({f"{target.path}.{name}": t for name, t in tensors.items()})
            if bias is not None:
                collect[f"{target.path}.bias"] = bias.detach()
        _replace(target, tensors, None if bias is None else bias.detach(), bits=bits, group_size=group_size,
                 dtype=weight.dtype)
        del current, weight, tensors, bias
        chosen.append(target.path)
    if kept:
        log.warning("%d-bit quantization kept %d weight(s) float: %s", bits, len(kept), ", ".join(kept))
    return chosen


def snapshot_shapes(shape: torch.Size | tuple[int, ...], bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The snapshot tensors' shapes for a float weight of `shape` (..., N, K)."""
    *lead, n, k = shape
    if bits == 8:
        return {"weight": (*lead, n, k), "scales": (*lead, n)}
    return {"weight": (*lead, n, k // 2), "scales": (*lead, n, k // group_size),
            "biases": (*lead, n, k // group_size)}


def apply_marker(model: nn.Module, marker: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Give a model built on meta the quantized structure a converted snapshot was saved with, strictly.

    A weight is quantized exactly when the snapshot holds its `scales`, so the structure follows the file. One
    `CheckpointError` names every missing, unexpected or misshapen tensor (quantized or not) and every quantized
    weight of the wrong integer type. The quantized tensors are consumed; the float rest is left in `tensors`.
    """
    bits, group_size = int(marker["bits"]), int(marker["group_size"])
    targets = [t for t in _targets(model, ("",)) if f"{t.path}.scales" in tensors]
    expected = {name: tuple(value.shape) for name, value in model.state_dict(keep_vars=True).items()}
    for target in targets:
        shapes = snapshot_shapes(expected.pop(target.weight_name), bits, group_size)
        expected.update({f"{target.path}.{name}": shape for name, shape in shapes.items()})
    check_strict(expected, {name: tuple(value.shape) for name, value in tensors.items()})
    want = torch.int8 if bits == 8 else torch.uint8
    wrong = [f"{t.path}.weight: {tensors[f'{t.path}.weight'].dtype} (a {bits}-bit snapshot holds {want})"
             for t in targets if tensors[f"{t.path}.weight"].dtype != want]
    if wrong:
        raise CheckpointError("checkpoint does not match the model: wrong weight types: " + "; ".join(wrong))
    for target in targets:
        own = {name: tensors.pop(f"{target.path}.{name}") for name in SNAPSHOT_NAMES[bits]}
        bias = None if target.stacked else tensors.pop(f"{target.path}.bias", None)
        _replace(target, own, bias, bits=bits, group_size=group_size, dtype=own["scales"].dtype)
    return [t.path for t in targets]


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (packed weights and scales included)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def convert(model_dir: Path, output_dir: Path, bits: int, group_size: int = 64, *,
            kind: str | None = None, dtype: str = "bfloat16", vision: bool = False) -> dict[str, int]:
    """Write a pre-quantized torch snapshot of an original checkpoint directory; returns weight bytes before/after.

    The output directory holds the other snapshot files unchanged, `model.safetensors` in torch module names and
    config.json with the quantization marker (`"format": "torch"`). `kind` (a model id) is read from config.json's
    `model_type` when not given; `vision` also quantizes the vision towers and projector.
    """
    check_options(bits, group_size)
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    raw = prepare_output(model_dir, output_dir)
    module = _model_module(kind or kind_of(raw, model_dir))
    model = module.load(model_dir / "config.json", model_dir, dtype=dtype, device="cpu")
    before = weight_bytes(model)
    prefixes = module.QUANTIZE_PREFIXES + (module.VISION_PREFIXES if vision else ())
    saved: dict[str, torch.Tensor] = {}
    quantize_model(model, bits=bits, group_size=group_size, prefixes=prefixes, collect=saved)
    tensors = {name: t.contiguous() for name, t in {**model.state_dict(), **saved}.items()}
    after = sum(t.numel() * t.element_size() for t in tensors.values())
    copy_snapshot_files(model_dir, output_dir)
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    mode = "symmetric" if bits == 8 else "affine"
    write_config(output_dir, raw, {"bits": bits, "group_size": group_size, "mode": mode, "format": FORMAT})
    return {"before": before, "after": after}


def _model_module(kind: str):
    # Imported here: the model modules import this one.
    return importlib.import_module(f"torch_ocr.{get_family(kind).module}")

