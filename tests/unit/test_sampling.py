"""The NumPy reference in common/sampling.py against transformers' processors, plus the rules transformers lacks.

transformers is a test-only dependency here: its processors are the definition the official `infer()` decodes
with, so agreeing with them on random logits is what makes the NumPy code a reference.
"""
from __future__ import annotations

import numpy as np
import pytest

from common.errors import UserError
from common.sampling import (NGramIndex, SamplingOptions, apply_temperature, apply_top_k, apply_top_p,
                             check_options, make_processors, make_sampler, no_repeat_ngram, repetition_penalty)

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

V = 97


def _logits(seed: int, batch: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, V)) * 3).astype(np.float32)


def _history(seed: int, batch: int = 3, length: int = 60, alphabet: int = 6) -> np.ndarray:
    # a small alphabet makes repeated n-grams (and so bans) frequent
    return np.random.default_rng(seed).integers(0, alphabet, (batch, length)).astype(np.int64)


def _hf(processor, history: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return processor(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(seed: int, penalty: float) -> None:
    h, x = _history(seed), _logits(seed)
    want = _hf(lp.RepetitionPenaltyLogitsProcessor(penalty), h, x)
    np.testing.assert_allclose(repetition_penalty(h, x, penalty), want, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_no_repeat_ngram_matches_transformers(seed: int, size: int) -> None:
    h, x = _history(seed, alphabet=3 if size > 2 else 6), _logits(seed)
    want = _hf(lp.NoRepeatNGramLogitsProcessor(size), h, x)
    got = no_repeat_ngram(h, x, size)
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got).any(), "the test history must trigger bans"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_transformers(seed: int, temperature: float) -> None:
    x = _logits(seed)
    want = _hf(lp.TemperatureLogitsWarper(temperature), _history(seed), x)
    np.testing.assert_allclose(apply_temperature(x, temperature), want, rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 5, 40, V + 5])
def test_top_k_matches_transformers(seed: int, k: int) -> None:
    x = _logits(seed)
    np.testing.assert_array_equal(apply_top_k(x, k), _hf(lp.TopKLogitsWarper(k), _history(seed), x))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(seed: int, p: float) -> None:
    x = _logits(seed)
    np.testing.assert_array_equal(apply_top_p(x, p), _hf(lp.TopPLogitsWarper(p), _history(seed), x))


def test_top_k_keeps_ties_at_the_boundary() -> None:
    x = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    assert np.isfinite(apply_top_k(x, 2)).tolist() == [[False, True, True, True, False]]


def test_windowed_ngram_ban_by_hand() -> None:
    # 2-grams of [5, 6, 9, 9, 5, 6, 7, 5]: prefix (5,) was followed by 6 (starts 0 and 4)
    h = np.array([[5, 6, 9, 9, 5, 6, 7, 5]])
    x = np.zeros((1, 10), dtype=np.float32)
    assert np.isinf(no_repeat_ngram(h, x, 2)).nonzero()[1].tolist() == [6]
    # window 4 = the n-grams starting at 4..6: (5,6) at 4 still counts
    assert np.isinf(no_repeat_ngram(h, x, 2, window=4)).nonzero()[1].tolist() == [6]
    # window 3: only starts 5 and 6 -> (6,7) and (7,5); nothing follows (5,) there
    assert not np.isinf(no_repeat_ngram(h, x, 2, window=3)).any()
    assert not np.isinf(no_repeat_ngram(h, x, 2, exempt=[6])).any()


@pytest.mark.parametrize("window", [0, 7, 20])
def test_incremental_index_equals_scan(window: int) -> None:
    ids = _history(11, batch=1, length=200, alphabet=3)[0]
    exempt = frozenset({2})
    index = NGramIndex(4)
    x = np.zeros((1, 4), dtype=np.float32)
    for length in range(1, len(ids) + 1):
        index.extend(ids[length - 1:length])
        want = np.isinf(no_repeat_ngram(ids[None, :length], x, 4, window, exempt)).nonzero()[1].tolist()
        assert index.banned(window, exempt) == want


def test_processor_order_and_switches() -> None:
    assert make_processors(SamplingOptions(no_repeat_ngram_size=0)) == []
    both = make_processors(SamplingOptions(repetition_penalty=1.5, no_repeat_ngram_size=2))
    h, x = np.array([[1, 2, 1]]), np.array([[0.5, 4.0, -1.0, 2.0]], dtype=np.float32)
    for process in both:
        x = process(h, x)
    np.testing.assert_allclose(x, [[0.5, 4.0 / 1.5, -np.inf, 2.0]])


def test_greedy_ignores_temperature_and_sampling_repeats_with_seed() -> None:
    x = _logits(3)
    greedy = make_sampler(SamplingOptions(do_sample=False, temperature=5.0, top_k=1))
    np.testing.assert_array_equal(greedy(x), x.argmax(-1))
    assert make_sampler(SamplingOptions(do_sample=True, temperature=0.0))(x).tolist() == x.argmax(-1).tolist()
    opts = SamplingOptions(do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    a, b = make_sampler(opts), make_sampler(opts)
    draws_a = [a(x).tolist() for _ in range(20)]
    assert draws_a == [b(x).tolist() for _ in range(20)]
    assert len({tuple(d) for d in draws_a}) > 1, "a hot sampler should not return one id 20 times"


def test_top_k_one_sampling_is_greedy() -> None:
    x = _logits(5)
    sample = make_sampler(SamplingOptions(do_sample=True, temperature=1.0, top_k=1, seed=0))
    assert sample(x).tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0.0), dict(no_repeat_ngram_size=-1)])
def test_bad_options_are_user_errors(bad: dict) -> None:
    with pytest.raises(UserError):
        check_options(SamplingOptions(**bad))


@pytest.mark.parametrize("seed", range(3))
def test_warper_order_matches_transformers(seed: int) -> None:
    """`make_warpers` chains temperature -> top-k -> top-p as transformers' generate does; the order matters
    (top-p after a temperature keeps another set than before it)."""
    from common.sampling import make_warpers

    x, h = _logits(seed), _history(seed)
    options = SamplingOptions(do_sample=True, temperature=2.5, top_k=20, top_p=0.6)
    want = x
    for processor in (lp.TemperatureLogitsWarper(2.5), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.6)):
        want = _hf(processor, h, want)
    got = x
    for warp in make_warpers(options):
        got = warp(got)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    swapped = apply_temperature(apply_top_p(apply_top_k(x, 20), 0.6), 2.5)
    assert not np.array_equal(np.isfinite(swapped), np.isfinite(want)), "the case must tell the orders apart"
