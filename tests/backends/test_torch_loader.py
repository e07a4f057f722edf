"""torch_ocr/loader.py: windowed reading gives every tensor, cast, owning its memory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torch_ocr import loader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windows_of_one_tensor_read_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               dtype: torch.dtype) -> None:
    original = {f"w{i}": torch.randn(3, 5) for i in range(5)} | {"ids": torch.arange(4)}
    path = tmp_path / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in original.items()}, str(path))
    monkeypatch.setattr(loader, "MAP_WINDOW_BYTES", 1)  # reopen the map for every tensor
    read = dict(loader.read_safetensors([path], dtype=dtype, skip=lambda name: name == "w3"))
    assert sorted(read) == ["ids", "w0", "w1", "w2", "w4"]
    assert read["ids"].dtype == torch.int64 and read["ids"].tolist() == [0, 1, 2, 3]
    for name in ("w0", "w1", "w2", "w4"):
        assert read[name].dtype == dtype
        torch.testing.assert_close(read[name].float(), original[name].to(torch.bfloat16).float())
        read[name].add_(1.0)  # owned, writable memory: the file is untouched
    again = dict(loader.read_safetensors([path], dtype=torch.bfloat16))
    torch.testing.assert_close(again["w0"].float(), original["w0"].to(torch.bfloat16).float())
