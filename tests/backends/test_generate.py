"""The single-sequence path (torch_ocr/generate.py, mlx_ocr/generate.py: the engine with one slot) on a toy model with the real protocol.

The toy is a real computation: embeddings (image rows spliced in at the image token), position-rotated keys kept
in the backend's KVCache, one attention read-out and a linear head, so a wrong cache, position or history changes
the ids. Expected values come from the toy's own uncached forward and from NumPy, never from the loop.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pytest

from common.generation import GenerationOptions
from common.sampling import SamplingOptions
from common.timing import Timings

V, D, IMAGE_ID = 24, 12, 23


@dataclass(frozen=True)
class ToyInputs:
    input_ids: np.ndarray                 # (L,) int64
    image: np.ndarray | None = None       # (N_image_tokens, D) features

    @property
    def next_position(self) -> int:
        return int(self.input_ids.shape[0])

    def extended(self, token_ids: Sequence[int]) -> ToyInputs:
        return replace(self, input_ids=np.concatenate([self.input_ids, np.asarray(token_ids, dtype=np.int64)]))


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"embed": g.standard_normal((V, D)).astype(np.float32),
            "head": (g.standard_normal((D, V)) * 1.5).astype(np.float32),
            "vision": (g.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)}


class TorchToy:
    def __init__(self, seed: int = 0) -> None:
        import torch
        self.t = torch
        self.w = {k: torch.from_numpy(v) for k, v in _weights(seed).items()}
        self.calls = {"encode": 0, "prefill": 0, "step": 0}

    def encode_images(self, inputs: ToyInputs):
        self.calls["encode"] += 1
        return None if inputs.image is None else self.t.tanh(self.t.from_numpy(inputs.image) @ self.w["vision"])

    def _keys(self, x, positions):                       # x (B, L, D), positions (B, L) -> (B, 1, L, D)
        angle = positions.to(self.t.float32)[..., None] * 0.37 + self.t.arange(D) * 0.11
        return (x * self.t.cos(angle) + x.roll(1, -1) * self.t.sin(angle))[:, None]

    def _read(self, query, keys):                        # query (B, 1, 1, D), keys (B, 1, T, D) -> (B, V)
        weights = self.t.softmax((query @ keys.transpose(-1, -2)) / D ** 0.5, dim=-1)
        return ((weights @ keys + query)[:, 0, 0] @ self.w["head"]).float()

    def prefill(self, inputs: ToyInputs, image_embeds, cache):
        self.calls["prefill"] += 1
        ids = self.t.from_numpy(inputs.input_ids)
        x = self.w["embed"][ids].clone()
        if image_embeds is not None:
            x[ids == IMAGE_ID] = image_embeds
        keys = self._keys(x[None], self.t.arange(len(ids))[None])
        all_keys = cache[0].update(keys, keys)[0] if cache is not None else keys
        return self._read(keys[:, :, -1:], all_keys)

    def step(self, token_ids, positions, cache):
        self.calls["step"] += 1
        keys = self._keys(self.w["embed"][token_ids][:, None], positions[:, None])
        return self._read(keys, cache[0].update(keys, keys)[0])

    def make_cache(self, batch_size: int, max_length: int):
        from torch_ocr.cache import KVCache
        return [KVCache(batch_size, 1, D, max_length, dtype=self.t.float32, device="cpu")]

    device = "cpu"

    def make_slot_cache(self, max_batch: int, capacity: int):
        from torch_ocr.cache import SlotCache
        return SlotCache(1, max_batch, 1, D, capacity, dtype=self.t.float32, device="cpu")


class MLXToy:
    def __init__(self, seed: int = 0) -> None:
        import mlx.core as mx
        self.mx = mx
        self.w = {k: mx.array(v) for k, v in _weights(seed).items()}
        self.calls = {"encode": 0, "prefill": 0, "step": 0}

    def encode_images(self, inputs: ToyInputs):
        self.calls["encode"] += 1
        return None if inputs.image is None else self.mx.tanh(self.mx.array(inputs.image) @ self.w["vision"])

    def _keys(self, x, positions):
        mx = self.mx
        angle = positions.astype(mx.float32)[..., None] * 0.37 + mx.arange(D) * 0.11
        return (x * mx.cos(angle) + mx.roll(x, 1, axis=-1) * mx.sin(angle))[:, None]

    def _read(self, query, keys):
        mx = self.mx
        weights = mx.softmax((query @ keys.swapaxes(-1, -2)) / D ** 0.5, axis=-1)
        return ((weights @ keys + query)[:, 0, 0] @ self.w["head"]).astype(mx.float32)

    def prefill(self, inputs: ToyInputs, image_embeds, cache):
        mx = self.mx
        self.calls["prefill"] += 1
        x = self.w["embed"][mx.array(inputs.input_ids)]
        if image_embeds is not None:
            where = np.nonzero(inputs.input_ids == IMAGE_ID)[0]
            x[mx.array(where)] = image_embeds
        keys = self._keys(x[None], mx.arange(len(inputs.input_ids))[None])
        all_keys = cache[0].update(keys, keys)[0] if cache is not None else keys
        return self._read(keys[:, :, -1:], all_keys)

    def step(self, token_ids, positions, cache):
        self.calls["step"] += 1
        keys = self._keys(self.w["embed"][token_ids][:, None], positions[:, None])
        return self._read(keys, cache[0].update(keys, keys)[0])

    def make_cache(self, batch_size: int, max_length: int):
        from mlx_ocr.cache import KVCache
        return [KVCache(batch_size, 1, D, max_length, dtype=self.mx.float32)]

    device = "cpu"

    def make_slot_cache(self, max_batch: int, capacity: int):
        from mlx_ocr.cache import SlotCache
        return SlotCache(1, max_batch, 1, D, capacity, dtype=self.mx.float32)


@pytest.fixture(params=["torch", "mlx"])
def backend(request: pytest.FixtureRequest) -> tuple[Any, type]:
    if request.param == "torch":
        pytest.importorskip("torch")
        from torch_ocr.generate import generate
        return generate, TorchToy
    pytest.importorskip("mlx.core")
    from mlx_ocr.generate import generate
    return generate, MLXToy


PROMPT = ToyInputs(np.array([3, 7, 1, 4], dtype=np.int64))
PLAIN = SamplingOptions(no_repeat_ngram_size=0)


def _run(backend, options: GenerationOptions, inputs: ToyInputs = PROMPT, model=None, timings=None, cancel=None):
    generate, toy = backend
    model = model if model is not None else toy()
    return list(generate(model, inputs, options, timings or Timings(), cancel))


def _ids(tokens) -> list[int]:
    return [t.token_id for t in tokens]


def _raw_logprobs(model, inputs: ToyInputs, generated: list[int]) -> np.ndarray:
    """NumPy log-softmax of the toy's uncached logits after `generated` (the distribution the loop drew from)."""
    image = model.encode_images(inputs)
    logits = np.array(model.prefill(inputs.extended(generated), image, None).tolist(), dtype=np.float64)[0]
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def test_max_new_tokens_and_ignore_eos(backend) -> None:
    free = _ids(_run(backend, GenerationOptions(max_new_tokens=12, sampling=PLAIN)))
    assert len(free) == 12
    stop = free[4]
    first = free.index(stop)
    stopped = _ids(_run(backend, GenerationOptions(max_new_tokens=12, stop_token_ids=(stop,), sampling=PLAIN)))
    assert stopped == free[:first + 1], "stops right after yielding the stop id"
    ignored = _ids(_run(backend, GenerationOptions(max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True,
                                                   sampling=PLAIN)))
    assert ignored == free
    assert _run(backend, GenerationOptions(max_new_tokens=0, sampling=PLAIN)) == []


def test_greedy_matches_the_uncached_argmax(backend) -> None:
    """Each greedy id is the argmax of the toy's full forward over prompt + ids so far (computed outside the loop)."""
    _, toy = backend
    model = toy()
    ids = _ids(_run(backend, GenerationOptions(max_new_tokens=8, sampling=PLAIN), model=model))
    for i, token in enumerate(ids):
        assert token == int(np.argmax(_raw_logprobs(model, PROMPT, ids[:i])))


@pytest.mark.parametrize("sampling", [PLAIN, SamplingOptions(no_repeat_ngram_size=2, repetition_penalty=1.3),
                                      SamplingOptions(do_sample=True, temperature=0.9, top_k=8, seed=11)])
def test_use_cache_false_gives_the_same_ids(backend, sampling: SamplingOptions) -> None:
    image_inputs = ToyInputs(np.array([3, IMAGE_ID, IMAGE_ID, 5], dtype=np.int64),
                             np.random.default_rng(2).standard_normal((2, D)).astype(np.float32))
    for inputs in (PROMPT, image_inputs):
        cached = _run(backend, GenerationOptions(max_new_tokens=15, sampling=sampling, logprobs=2), inputs)
        _, toy = backend
        model = toy()
        uncached = _run(backend, GenerationOptions(max_new_tokens=15, sampling=sampling, logprobs=2, use_cache=False),
                        inputs, model=model)
        assert _ids(cached) == _ids(uncached)
        np.testing.assert_allclose([t.logprob for t in cached], [t.logprob for t in uncached], atol=1e-4)
        assert model.calls["step"] == 0 and model.calls["encode"] == 1, "uncached: full forwards, vision once"


def test_images_reach_the_model(backend) -> None:
    ids = np.array([3, IMAGE_ID, IMAGE_ID, 5], dtype=np.int64)
    images = np.random.default_rng(9).standard_normal((2, 2, D)).astype(np.float32) * 3
    first = [_run(backend, GenerationOptions(max_new_tokens=1, logprobs=V, sampling=PLAIN), ToyInputs(ids, image))[0]
             for image in images]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(first[0].top_logprobs, first[1].top_logprobs)) > 1e-3


def test_cancel_between_tokens(backend) -> None:
    generate, toy = backend
    cancel = threading.Event()
    seen = []
    for token in generate(toy(), PROMPT, GenerationOptions(max_new_tokens=20, sampling=PLAIN), Timings(), cancel):
        seen.append(token)
        if len(seen) == 3:
            cancel.set()
    assert len(seen) == 3
    cancel_before = threading.Event()
    cancel_before.set()
    assert _run(backend, GenerationOptions(max_new_tokens=5, sampling=PLAIN), cancel=cancel_before) == []


def test_logprobs_are_raw(backend) -> None:
    """Reported logprobs are the model's log-softmax before the penalty, the n-gram ban and the temperature."""
    _, toy = backend
    model = toy()
    sampling = SamplingOptions(do_sample=True, temperature=0.5, repetition_penalty=3.0, no_repeat_ngram_size=1, seed=4)
    tokens = _run(backend, GenerationOptions(max_new_tokens=6, logprobs=3, sampling=sampling), model=model)
    ids = _ids(tokens)
    for i, token in enumerate(tokens):
        raw = _raw_logprobs(model, PROMPT, ids[:i])
        assert token.logprob == pytest.approx(raw[token.token_id], abs=1e-4)
        want_top = np.argsort(-raw)[:3]
        assert [t.token_id for t in token.top_logprobs] == want_top.tolist()
        np.testing.assert_allclose([t.logprob for t in token.top_logprobs], raw[want_top], atol=1e-4)
    # the n-gram ban of size 1 forbids every id already seen, so the raw favourite cannot always have been chosen
    assert len(set(ids)) == len(ids) and not set(ids) & set(PROMPT.input_ids.tolist())
    assert _run(backend, GenerationOptions(max_new_tokens=2, sampling=PLAIN))[0].logprob is None


def test_seeded_sampling_repeats(backend) -> None:
    def run(seed: int) -> list[int]:
        sampling = SamplingOptions(do_sample=True, temperature=1.5, top_p=0.95, no_repeat_ngram_size=0, seed=seed)
        return _ids(_run(backend, GenerationOptions(max_new_tokens=20, sampling=sampling)))

    assert run(5) == run(5)
    assert len({tuple(run(s)) for s in range(4)}) > 1


def test_ngram_ban_in_the_loop(backend) -> None:
    plain = _ids(_run(backend, GenerationOptions(max_new_tokens=40, sampling=PLAIN)))
    banned = _ids(_run(backend, GenerationOptions(max_new_tokens=40, sampling=SamplingOptions(no_repeat_ngram_size=3))))

    def trigrams(ids: list[int]) -> list[tuple[int, ...]]:
        return [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]

    whole = PROMPT.input_ids.tolist() + banned
    assert len(set(trigrams(whole))) == len(trigrams(whole)), "no 3-gram repeats, prompt included"
    plain_whole = PROMPT.input_ids.tolist() + plain
    assert len(set(trigrams(plain_whole))) < len(trigrams(plain_whole)), "the toy repeats itself without the ban"


def test_ngram_window_and_exempt_in_the_loop(backend) -> None:
    window = SamplingOptions(no_repeat_ngram_size=3, ngram_window=8)
    ids = PROMPT.input_ids.tolist() + _ids(_run(backend, GenerationOptions(max_new_tokens=40, sampling=window)))
    for end in range(3, len(ids) + 1):        # no 3-gram repeats inside any 8-id window
        grams = [tuple(ids[i:i + 3]) for i in range(max(0, end - 8), end - 2)]
        assert len(set(grams)) == len(grams)
    plain = _ids(_run(backend, GenerationOptions(max_new_tokens=40, sampling=PLAIN)))
    exempt = SamplingOptions(no_repeat_ngram_size=1, ngram_exempt_ids=tuple(range(V)))
    assert _ids(_run(backend, GenerationOptions(max_new_tokens=40, sampling=exempt))) == plain


def test_timings_stages(backend) -> None:
    timings = Timings()
    tokens = _run(backend, GenerationOptions(max_new_tokens=7, sampling=PLAIN), timings=timings)
    assert len(tokens) == 7
    assert timings.counts["vision.compute_embeddings"] == 1
    assert timings.counts["decode.prefill"] == 1
    assert timings.counts["decode.iterative"] == 6
    assert timings.counts["decode.generate"] == 1
    parts = sum(timings.total_ms[s] for s in ("vision.compute_embeddings", "decode.prefill", "decode.iterative"))
    assert 0 < parts <= timings.total_ms["decode.generate"] * 1.01 + 0.5


def test_abandoned_generator_still_books_its_time(backend) -> None:
    generate, toy = backend
    timings = Timings()
    stream = generate(toy(), PROMPT, GenerationOptions(max_new_tokens=50, sampling=PLAIN), timings)
    next(stream), next(stream)
    stream.close()
    assert timings.counts["decode.generate"] == 1 and timings.counts["decode.iterative"] == 1


# ------------------------------------------------------------------ the real models through load_model (tiny)

def _real_inputs(kind: str, snapshot) -> Any:
    import json

    from PIL import Image

    from common import deepseek_ocr, paddleocr_vl
    from common.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    if kind == "deepseek-ocr":
        return deepseek_ocr.build_inputs("<image>\nFree OCR.", [image], tokenizer, base_size=512, image_size=512,
                                         crop_mode=False)
    return paddleocr_vl.build_inputs("OCR:", [image], tokenizer, (snapshot / "chat_template.jinja").read_text(),
                                     json.loads((snapshot / "preprocessor_config.json").read_text()))


@pytest.fixture(scope="module")
def greedy_ids() -> dict[str, list[int]]:
    """Ids of the first backend run per kind, so the other backend is held to them."""
    return {}


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
@pytest.mark.parametrize("kind", ["deepseek-ocr", "paddleocr-vl"])
@pytest.mark.slow
def test_load_model_smoke(request: pytest.FixtureRequest, kind: str, backend_name: str,
                          greedy_ids: dict[str, list[int]]) -> None:
    """Load a tiny real-layout checkpoint, generate cached and uncached; both backends agree on the ids."""
    import importlib

    pytest.importorskip("torch" if backend_name == "torch" else "mlx.core")
    model_module = f"{backend_name}_ocr.{kind.replace('-', '_')}"
    if importlib.util.find_spec(model_module) is None:
        pytest.skip(f"{model_module} is not written yet")
    snapshot = request.getfixturevalue("deepseek_tiny" if kind == "deepseek-ocr" else "paddle_tiny")
    load_model = importlib.import_module(f"{backend_name}_ocr.backend").load_model
    model = load_model(kind, snapshot / "config.json", snapshot, dtype="auto", device="cpu")
    assert (model.kind, model.backend, model.device, model.dtype) == (kind, backend_name, "cpu", "float32")
    inputs = _real_inputs(kind, snapshot)
    runs = []
    for use_cache in (True, False):
        timings = Timings()
        options = GenerationOptions(max_new_tokens=4, use_cache=use_cache, logprobs=1, ignore_eos=True)
        runs.append(list(model.generate(inputs, options, timings)))
        assert timings.counts["decode.iterative"] == 3 and timings.total_ms["vision.compute_embeddings"] > 0
    assert _ids(runs[0]) == _ids(runs[1]) and len(runs[0]) == 4
    assert all(t.logprob is not None and t.logprob <= 0 for t in runs[0])
    if kind in greedy_ids:
        assert _ids(runs[0]) == greedy_ids[kind], "torch and MLX disagree on greedy ids"
    greedy_ids[kind] = _ids(runs[0])


def test_load_model_refusals() -> None:
    from common.errors import UnknownModelError, UserError

    pytest.importorskip("torch")
    from torch_ocr.backend import load_model as torch_load, resolve_dtype

    with pytest.raises(UnknownModelError):
        torch_load("gpt-5", "config.json", "weights", dtype="auto", device="cpu")
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("int3", __import__("torch").device("cpu"))
    pytest.importorskip("mlx.core")
    from mlx_ocr.backend import resolve_device

    with pytest.raises(UserError, match="torch backend"):
        resolve_device("cuda")
    assert resolve_device("auto") in ("cpu", "metal")
