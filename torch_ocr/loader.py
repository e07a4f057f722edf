"""Reading original hub checkpoints into modules: memory-mapped, one copy, strict in both directions.

Modules are built on the `meta` device (no storage), tensors are read one at a time from the memory-mapped
safetensors file (a window of it at a time), cast and moved, then assigned in place of the meta parameters: the
weights are never held twice. Load-time quantization and converted snapshots are `quantize.py`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from safetensors import safe_open

from common.checkpoints import check_strict, checkpoint_files
from common.errors import ModelFilesError, UserError

from . import quantize as quantization

M = TypeVar("M", bound=torch.nn.Module)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


#: Bytes of tensors read through one memory map before it is closed (see `read_safetensors`).
MAP_WINDOW_BYTES = 256 * 2**20


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ModelFilesError(f"{path}: not a readable safetensors file ({exc})") from None


def read_safetensors(
    files: Iterable[Path],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    skip: Callable[[str], bool] = lambda name: False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (original name, tensor) from memory-mapped files, floating tensors cast to `dtype` on `device`.

    Every yielded tensor owns its memory, and each map is closed after `MAP_WINDOW_BYTES` of tensors: a tensor
    still viewing the file would keep the whole map resident next to any copy made from it (stacked experts),
    which doubled the resident memory of a bfloat16 DeepSeek-OCR load. So the weights are held once.
    """
    target = torch.device(device)
    for path in files:
        with _open(path) as f:
            names = [name for name in f.keys() if not skip(name)]
        start = 0
        while start < len(names):
            with _open(path) as f:
                window = 0
                while start < len(names) and window < MAP_WINDOW_BYTES:
                    name, start = names[start], start + 1
                    mapped = f.get_tensor(name)
                    window += mapped.numel() * mapped.element_size()
                    tensor = mapped.to(dtype=dtype) if mapped.is_floating_point() else mapped
                    tensor = tensor.to(target)
                    if tensor.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
                        tensor = tensor.clone()  # still a view of the map: copy it out before the map closes
                    yield name, tensor


def assign_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Assign `tensors` to the module's parameters and buffers by name; every one must match exactly.

    Raises `CheckpointError` listing every missing key, unexpected key and shape mismatch by name
    (`common.checkpoints.check_strict`).
    Non-persistent buffers (computed, e.g. RoPE tables) are not expected in the checkpoint.
    """
    expected = dict(module.state_dict(keep_vars=True))
    check_strict({name: value.shape for name, value in expected.items()},
                 {name: value.shape for name, value in tensors.items()})
    module.load_state_dict(tensors, strict=True, assign=True)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda:N' picks a GPU. 'metal' belongs to the MLX backend.

    The one device rule of this backend: `torch_ocr.backend` and `load_module` both call it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (device == "cuda" or device.startswith("cuda:")) and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but PyTorch sees no CUDA device", param="device")
    if device == "metal":
        raise UserError("device metal needs the MLX backend (backend mlx)", param="device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} for PyTorch (auto, cpu, cuda or cuda:N)", param="device") from None


def load_module(
    model_class: Callable[[Any], M],
    config_class: Any,
    config_path: str | Path,
    weights_path: str | Path,
    *,
    dtype: str | torch.dtype,
    device: str | torch.device,
    sanitize: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    skip: Callable[[str], bool] = lambda name: False,
    quantize: int | None = None,
    group_size: int = 64,
    prefixes: tuple[str, ...] = (),
) -> M:
    """`model_class(config_class.from_file(config_path))` built on meta, the original checkpoint assigned.

    The one loading sequence of both models: tensors read memory-mapped (those `skip` names never leave the
    file), cast to `dtype` on `device`, `sanitize`d to module names and assigned strictly; `quantize` bits then
    quantize the weights under `prefixes`, freeing each float weight as it goes. A converted snapshot (its
    config.json carries the quantization marker) is already in module names and quantized: it skips `sanitize`
    and loads as saved, as strictly. Returned in eval mode with gradients off. Raises `UserError` for bad
    options, an unknown dtype or device and an MLX snapshot, `CheckpointError` on a mismatch.
    """
    if quantize:
        quantization.check_options(quantize, group_size)
    _, marker = quantization.read_config(Path(config_path))
    config = config_class.from_file(config_path)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})", param="dtype")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    target = resolve_device(device) if isinstance(device, str) else device
    with torch.device("meta"):
        model = model_class(config)
    tensors = dict(read_safetensors(checkpoint_files(Path(weights_path)), dtype=torch_dtype, device=target,
                                    skip=skip))
    if marker is None:
        assign_strict(model, sanitize(tensors))
        del tensors  # the model holds the only references: quantizing frees each float weight
        if quantize:
            quantization.quantize_model(model, bits=quantize, group_size=group_size, prefixes=prefixes)
    else:
        quantization.apply_marker(model, marker, tensors)
        assign_strict(model, tensors)
    return model.eval().requires_grad_(False)
