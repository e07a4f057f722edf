"""The float32 CPU linear of `torch_ocr.layers`: the same product as `F.linear`, on every input shape it meets."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from torch_ocr import layers  # noqa: E402


def _inputs(*shape: int, k: int = 96) -> torch.Tensor:
    return torch.randn(*shape, k, generator=torch.Generator().manual_seed(sum(shape) + 1))


@pytest.mark.parametrize("shape", [(1,), (8,), (1, 1), (2, 5), (3, 0), (0,), (1, 700)])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(40, 96, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    x = _inputs(*shape)
    with torch.inference_mode():
        got, want = layers.linear(x, weight, b), F.linear(x, weight, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_weight_view() -> None:
    x = _inputs(96, k=7).T  # (7, 96), transposed storage
    weight = torch.randn(96, 50).T  # (50, 96), a view
    with torch.inference_mode():
        torch.testing.assert_close(layers.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_other_dtypes_are_f_linear_bit_for_bit() -> None:
    x, weight = _inputs(3).bfloat16(), torch.randn(40, 96).bfloat16()
    with torch.inference_mode():
        assert torch.equal(layers.linear(x, weight), F.linear(x, weight))


def test_training_keeps_autograd() -> None:
    weight = torch.randn(40, 96, requires_grad=True)
    layers.linear(_inputs(2), weight).sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape


def test_module_keeps_nn_linear_parameters_and_names() -> None:
    module = layers.Linear(96, 40, bias=True)
    assert isinstance(module, torch.nn.Linear)
    assert sorted(module.state_dict()) == ["bias", "weight"]
    dense = module.weight.detach().clone()
    x = _inputs(4)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), F.linear(x, dense, module.bias), rtol=1e-5, atol=1e-5)
    # packed or not, the state dict is the dense weight under the same names
    assert sorted(module.state_dict()) == ["bias", "weight"]
    assert torch.equal(module.state_dict()["weight"], dense)


onednn = pytest.mark.skipif(not layers._ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


@onednn
@pytest.mark.parametrize("in_out", [(96, 40), (1024, 3072), (3072, 1024)])
def test_packed_rows_do_not_depend_on_the_row_count(in_out: tuple[int, int]) -> None:
    """What batched decoding needs: a row's result is the same whether 1 or 16 rows share the call."""
    module = layers.Linear(*in_out, bias=False)
    x = _inputs(16, k=in_out[0])
    with torch.inference_mode():
        alone = module(x[:1])
        assert module.weight.is_mkldnn  # packed by the first float32 call
        for rows in range(2, 17):
            assert torch.equal(module(x[:rows])[:1], alone), rows
        assert module(x[:1, None]).shape == (1, 1, in_out[1])  # (B, L, D) inputs as the models give them


@onednn
def test_bfloat16_and_training_are_never_packed() -> None:
    half = layers.Linear(96, 40).bfloat16()
    train = layers.Linear(96, 40)
    with torch.inference_mode():
        half(_inputs(2).bfloat16())
    train(_inputs(2)).sum().backward()
    assert not half.weight.is_mkldnn and not train.weight.is_mkldnn and train.weight.grad is not None


@onednn
def test_the_onednn_path_is_the_one_taken_on_cpu_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    namespace = torch.ops.mkldnn

    class Spy:
        def __getattr__(self, name: str):  # noqa: ANN204 - forwards everything else to the real namespace
            return getattr(namespace, name)

        def _linear_pointwise(self, *args):  # noqa: ANN002, ANN202
            calls.append(args[0].shape)
            return namespace._linear_pointwise(*args)

    monkeypatch.setattr(layers.torch.ops, "mkldnn", Spy(), raising=False)
    with torch.inference_mode():
        layers.linear(_inputs(2), torch.randn(40, 96))
        layers.linear(_inputs(2).double(), torch.randn(40, 96).double())
    assert calls == [torch.Size([2, 96])]


@onednn
def test_the_torch_backend_packs_float32_cpu_models_at_load(deepseek_tiny) -> None:
    """The reorder happens while loading (not in the first page's vision and prefill); bfloat16 stays dense."""
    from torch_ocr.backend import load_model

    def weights(dtype: str) -> list[bool]:
        model = load_model("deepseek-ocr", deepseek_tiny / "config.json", deepseek_tiny, dtype=dtype, device="cpu")
        return [m.weight.is_mkldnn for m in model.model.modules() if isinstance(m, layers.Linear)]

    packed = weights("float32")
    assert packed and all(packed)
    assert not any(weights("bfloat16"))
