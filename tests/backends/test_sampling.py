"""torch_ocr/sampling.py and mlx_ocr/sampling.py give the NumPy reference's result on the same logits."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest

import common.sampling as reference
from common.sampling import SamplingOptions

V = 211


@dataclass
class Backend:
    name: str
    module: ModuleType
    to: Callable[[np.ndarray], Any]
    back: Callable[[Any], np.ndarray]


def _torch() -> Backend:
    torch = pytest.importorskip("torch")
    import torch_ocr.sampling as module
    return Backend("torch", module, torch.from_numpy, lambda t: t.cpu().numpy())


def _mlx() -> Backend:
    mx = pytest.importorskip("mlx.core")
    import mlx_ocr.sampling as module
    return Backend("mlx", module, mx.array, np.array)


def _numpy() -> Backend:
    return Backend("numpy", reference, lambda a: a, lambda a: a)


@pytest.fixture(params=["torch", "mlx"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """A backend under test; what it returns is compared with the NumPy reference (never the reference with
    itself: the reference's own tests against transformers are tests/unit/test_sampling.py)."""
    return {"torch": _torch, "mlx": _mlx}[request.param]()


@pytest.fixture(params=["numpy", "torch", "mlx"])
def sampler_of(request: pytest.FixtureRequest) -> Backend:
    """Every implementation, for properties each must have on its own (seeded repeats, the distribution, RNG)."""
    return {"numpy": _numpy, "torch": _torch, "mlx": _mlx}[request.param]()


def _logits(seed: int, batch: int = 2) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, V)) * 2.5).astype(np.float32)


def _history(seed: int, batch: int = 2, length: int = 80, alphabet: int = 4) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, alphabet, (batch, length)).astype(np.int64)


def _run_processors(backend: Backend, options: SamplingOptions, history: np.ndarray, logits: np.ndarray) -> np.ndarray:
    x = backend.to(logits.copy())
    for process in backend.module.make_processors(options):
        x = process(backend.to(history), x)
    return backend.back(x)


def _reference_processors(options: SamplingOptions, history: np.ndarray, logits: np.ndarray) -> np.ndarray:
    x = logits.copy()
    for process in reference.make_processors(options):
        x = process(history, x)
    return x


PROCESSOR_CASES = {
    "repetition": SamplingOptions(repetition_penalty=1.4, no_repeat_ngram_size=0),
    "repetition_below_one": SamplingOptions(repetition_penalty=0.8, no_repeat_ngram_size=0),
    "ngram3": SamplingOptions(no_repeat_ngram_size=3),
    "ngram1": SamplingOptions(no_repeat_ngram_size=1),
    "ngram_window": SamplingOptions(no_repeat_ngram_size=3, ngram_window=12),
    "ngram_exempt": SamplingOptions(no_repeat_ngram_size=2, ngram_exempt_ids=(1, 2)),
    "both": SamplingOptions(repetition_penalty=1.2, no_repeat_ngram_size=4, ngram_window=30),
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
@pytest.mark.parametrize("seed", range(3))
def test_processors_match_reference(backend: Backend, case: str, seed: int) -> None:
    options, h, x = PROCESSOR_CASES[case], _history(seed), _logits(seed)
    want = _reference_processors(options, h, x)
    assert not np.array_equal(want, x), "each case must change something"
    np.testing.assert_allclose(_run_processors(backend, options, h, x), want, rtol=1e-6)


def test_ngram_processor_follows_a_growing_history(backend: Backend) -> None:
    """The incremental index inside the backend processor, fed one id at a time, equals a fresh scan."""
    options = SamplingOptions(no_repeat_ngram_size=3, ngram_window=25)
    (process,) = backend.module.make_processors(options)
    full, x = _history(7, length=120, alphabet=3), _logits(7)
    for length in range(1, full.shape[1] + 1, 3):
        h = full[:, :length]
        got = backend.back(process(backend.to(h), backend.to(x.copy())))
        np.testing.assert_array_equal(got, _reference_processors(options, h, x))


def test_processors_leave_their_input_alone(backend: Backend) -> None:
    x, h = _logits(1), _history(1)
    given = backend.to(x.copy())
    for process in backend.module.make_processors(PROCESSOR_CASES["both"]):
        process(backend.to(h), given)
    np.testing.assert_array_equal(backend.back(given), x)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 3, 50])
def test_top_k_mask(backend: Backend, seed: int, k: int) -> None:
    x = _logits(seed)
    np.testing.assert_array_equal(backend.back(backend.module.apply_top_k(backend.to(x), k)),
                                  reference.apply_top_k(x, k))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.1, 0.6, 0.95])
def test_top_p_mask(backend: Backend, seed: int, p: float) -> None:
    x = _logits(seed)
    got = np.isfinite(backend.back(backend.module.apply_top_p(backend.to(x), p)))
    np.testing.assert_array_equal(got, np.isfinite(reference.apply_top_p(x, p)))


def test_temperature(backend: Backend) -> None:
    x = _logits(2)
    np.testing.assert_allclose(backend.back(backend.module.apply_temperature(backend.to(x), 0.6)),
                               reference.apply_temperature(x, 0.6), rtol=1e-6)


@pytest.mark.parametrize("options", [
    SamplingOptions(do_sample=True, temperature=0.7, top_k=30, top_p=0.8),
    SamplingOptions(do_sample=True, temperature=1.6, top_p=0.5),
    SamplingOptions(do_sample=True, temperature=1.0, top_k=5),
], ids=["all_three", "temperature_top_p", "top_k"])
@pytest.mark.parametrize("seed", range(3))
def test_warper_chain_matches_reference(backend: Backend, options: SamplingOptions, seed: int) -> None:
    """The backend's warpers, applied in its order, keep the reference's ids with the reference's values."""
    x = _logits(seed)
    want = x
    for warp in reference.make_warpers(options):
        want = warp(want)
    got = backend.to(x.copy())
    for warp in backend.module.make_warpers(options):
        got = warp(got)
    got = backend.back(got)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert not np.isfinite(want).all(), "each case must drop some ids"
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)


def test_greedy_sampler(sampler_of: Backend) -> None:
    x = _logits(4, batch=5)
    sample = sampler_of.module.make_sampler(SamplingOptions(do_sample=False, temperature=3.0))
    assert sampler_of.back(sample(sampler_of.to(x))).astype(np.int64).tolist() == x.argmax(-1).tolist()


def test_seeded_sampling_repeats(sampler_of: Backend) -> None:
    x = _logits(6, batch=3)
    options = SamplingOptions(do_sample=True, temperature=1.3, top_k=40, top_p=0.9, seed=1234)
    runs = []
    for _ in range(2):
        sample = sampler_of.module.make_sampler(options)
        runs.append([sampler_of.back(sample(sampler_of.to(x))).astype(np.int64).tolist() for _ in range(15)])
    assert runs[0] == runs[1]
    allowed = np.isfinite(reference.apply_top_p(reference.apply_top_k(x / np.float32(1.3), 40), 0.9))
    for draw in runs[0]:
        assert all(allowed[b, t] for b, t in enumerate(draw)), "a draw fell outside the top-k/top-p set"
    assert len({tuple(d) for d in runs[0]}) > 1


def test_sampling_follows_the_distribution(sampler_of: Backend) -> None:
    """Frequencies of 4000 draws over 3 ids land near softmax(logits / T) (a loose 4-sigma bound)."""
    x = np.full((1, V), -np.inf, dtype=np.float32)
    x[0, :3] = [0.0, 1.0, 2.0]
    sample = sampler_of.module.make_sampler(SamplingOptions(do_sample=True, temperature=2.0, seed=5))
    batch = sampler_of.to(np.repeat(x, 4000, axis=0))
    counts = np.bincount(sampler_of.back(sample(batch)).astype(np.int64), minlength=3)[:3] / 4000
    p = np.exp(x[0, :3] / 2.0) / np.exp(x[0, :3] / 2.0).sum()
    assert np.all(np.abs(counts - p) < 4 * np.sqrt(p * (1 - p) / 4000))


def test_sampling_leaves_the_global_rng_alone(sampler_of: Backend) -> None:
    """Per-request generators only: a draw neither reads nor advances the framework's global RNG."""
    x = _logits(8)
    if sampler_of.name == "torch":
        import torch
        read = lambda: torch.get_rng_state().clone()  # noqa: E731
        same = lambda a, b: bool(torch.equal(a, b))  # noqa: E731
    elif sampler_of.name == "mlx":
        import mlx.core as mx
        read = lambda: np.array(mx.random.state[0])  # noqa: E731
        same = lambda a, b: bool(np.array_equal(a, b))  # noqa: E731
    else:
        read = lambda: np.random.get_state()[1].copy()  # noqa: E731
        same = lambda a, b: bool(np.array_equal(a, b))  # noqa: E731
    before = read()
    for seed in (None, 3):
        sample = sampler_of.module.make_sampler(SamplingOptions(do_sample=True, temperature=1.0, seed=seed))
        sampler_of.back(sample(sampler_of.to(x)))
    assert same(before, read())
