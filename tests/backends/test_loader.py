"""torch_ocr/loader.py and mlx_ocr/loader.py: one strict-load message (common.checkpoints.check_strict) and one
device rule per backend, the one its backend module uses."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from common.checkpoints import LISTED_NAMES, check_strict
from common.errors import CheckpointError, UserError


def _torch() -> tuple[Any, Callable[[np.ndarray], Any]]:
    torch = pytest.importorskip("torch")
    from torch_ocr import loader

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.norm = torch.nn.LayerNorm(2)

    return (loader, Tiny()), torch.from_numpy


def _mlx() -> tuple[Any, Callable[[np.ndarray], Any]]:
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    from mlx_ocr import loader

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2)
            self.norm = nn.LayerNorm(2)

    return (loader, Tiny()), mx.array


@pytest.fixture(params=["torch", "mlx"])
def backend(request: pytest.FixtureRequest) -> tuple[Any, Any, Callable[[np.ndarray], Any]]:
    (loader, module), to = {"torch": _torch, "mlx": _mlx}[request.param]()
    return loader, module, to


def _weights(to: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    shapes = {"proj.weight": (2, 3), "proj.bias": (2,), "norm.weight": (2,), "norm.bias": (2,)}
    return {name: to(np.ones(shape, dtype=np.float32)) for name, shape in shapes.items()}


def test_a_matching_checkpoint_loads(backend) -> None:
    loader, module, to = backend
    loader.assign_strict(module, _weights(to))


def test_each_fault_is_named_and_both_backends_say_it_alike(backend) -> None:
    loader, module, to = backend
    weights = _weights(to)
    del weights["norm.bias"]
    weights["proj.weight"] = to(np.ones((3, 3), dtype=np.float32))
    weights["lm_head.weight"] = to(np.ones((2, 2), dtype=np.float32))
    with pytest.raises(CheckpointError) as caught:
        loader.assign_strict(module, weights)
    assert str(caught.value) == ("checkpoint does not match the model: missing tensors: norm.bias | unexpected "
                                 "tensors: lm_head.weight | shape mismatches: proj.weight: checkpoint (3, 3) vs "
                                 "model (2, 3)")


def test_check_strict_counts_what_it_does_not_list() -> None:
    expected = {f"layer{i}": (1,) for i in range(LISTED_NAMES + 3)}
    with pytest.raises(CheckpointError, match=r"missing tensors: layer0, .* \.\.\. \(3 more\)$"):
        check_strict(expected, {})
    check_strict({"a": (2, 3)}, {"a": [2, 3]})  # a shape is compared as a tuple, whatever sequence holds it


def test_torch_has_one_device_rule() -> None:
    pytest.importorskip("torch")
    from torch_ocr import backend, loader

    assert backend.resolve_device is loader.resolve_device
    assert loader.resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="MLX backend"):
        loader.resolve_device("metal")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        loader.resolve_device("tpu")


def test_mlx_has_one_device_rule() -> None:
    pytest.importorskip("mlx.core")
    from mlx_ocr import backend, loader

    assert backend.resolve_device is loader.resolve_device
    # The backend module says cuda belongs to the torch backend; loading through the loader says the same.
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="torch backend"):
            loader.resolve_device(device)
    assert loader.resolve_device("cpu") == "cpu"
