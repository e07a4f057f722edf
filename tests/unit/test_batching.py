"""Many requests through one engine (common/batching.py, `Pipeline.map` / `Pipeline.batch`).

The ordering, error and cancel rules run on a scripted engine (ids chosen by the test); the last tests run the
real PyTorch backend on the tiny checkpoints and require every batched answer to equal its single run.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.config import load_settings
from common.engine import SlotState, Slots, StepToken
from common.errors import UserError
from common.generation import GeneratedToken
from common.pipeline import Pipeline, Request, Result, TextDelta

DS_EOS = 1


class ScriptedEngine:
    """Slot `s` of the k-th added request yields 100*k + 10, +11, ... then EOS after `lengths[k]` ids."""

    def __init__(self, max_batch: int, lengths: list[int]) -> None:
        self.slots: Slots[SlotState] = Slots(max_batch)
        self.max_batch, self.lengths, self.added, self.steps = max_batch, lengths, 0, 0
        self._script: dict[int, list[int]] = {}
        self.groups: list[int] = []                      # sizes of the add_many calls

    @property
    def active(self) -> list[int]:
        return self.slots.active

    @property
    def free_slots(self) -> int:
        return self.slots.free

    def add(self, inputs: Any, options: Any, timings: Any) -> int:
        slot = self.slots.take(SlotState.create(inputs, options, timings))
        k = self.added
        self.added += 1
        self._script[slot] = [100 * k + 10 + i for i in range(self.lengths[k % len(self.lengths)])] + [DS_EOS]
        return slot

    def add_many(self, requests: list[tuple[Any, Any, Any]]) -> list[int]:
        self.groups.append(len(requests))
        return [self.add(*request) for request in requests]

    def step(self) -> list[StepToken]:
        self.steps += 1
        out = []
        for slot in self.active:
            token = self._script[slot].pop(0)
            finished = self.slots.states[slot].record(token, 0.0)
            if finished:
                self.slots.release(slot)
            out.append(StepToken(slot, GeneratedToken(token), finished))
        return out

    def abort(self, slot: int) -> None:
        self.slots.release(slot)


class ScriptedModel:
    backend, device, dtype = "scripted", "cpu", "float32"

    def __init__(self, lengths: list[int]) -> None:
        self.lengths, self.engines = lengths, []

    def engine(self, max_batch: int) -> ScriptedEngine:
        self.engines.append(ScriptedEngine(max_batch, self.lengths))
        return self.engines[-1]


@pytest.fixture()
def settings(tmp_path: Path, deepseek_tiny: Path, paddle_tiny: Path) -> Any:
    config = tmp_path / "config.toml"
    config.write_text(f'[models.entries.deepseek-ocr]\nmodel_dir = "{deepseek_tiny}"\n'
                      f'[models.entries.paddleocr-vl]\nmodel_dir = "{paddle_tiny}"\n', encoding="utf-8")
    return load_settings(config, {})


def _scripted(settings: Any, lengths: list[int]) -> tuple[Pipeline, list[ScriptedModel]]:
    models: list[ScriptedModel] = []

    def load(kind: str, *args: Any, **kwargs: Any) -> ScriptedModel:
        models.append(ScriptedModel(lengths))
        return models[-1]

    return Pipeline(settings, load_model=load), models


def test_map_yields_in_input_order_though_short_answers_finish_first(settings: Any) -> None:
    pipe, models = _scripted(settings, [6, 1, 3, 2, 5])
    results = list(pipe.map([Request(f"page {i}") for i in range(5)], batch_size=2))
    firsts = [r.token_ids[0] for r in results]
    assert firsts == [10, 110, 210, 310, 410]            # input order
    assert [r.completion_tokens for r in results] == [7, 2, 4, 3, 6]
    assert all(r.finish_reason == "stop" for r in results)
    engine = models[0].engines[0]
    assert engine.max_batch == 2 and engine.added == 5
    assert engine.groups[0] == 2                          # the first two admitted together (one vision pass)
    assert engine.steps < 7 + 2 + 4 + 3 + 6               # rows decoded together, not one after another


def test_map_pulls_requests_lazily(settings: Any) -> None:
    pipe, _ = _scripted(settings, [2])
    pulled = []

    def requests():
        for i in range(6):
            pulled.append(i)
            yield Request(f"page {i}")

    stream = pipe.map(requests(), batch_size=2)
    next(stream)
    assert len(pulled) == 4                                # the first batch and its refill, not all six


def test_map_reports_a_bad_request_in_place_and_goes_on(settings: Any) -> None:
    pipe, _ = _scripted(settings, [2])
    bad = Request("<image>\nx")                             # a placeholder without its image
    good = [Request("a"), bad, Request("b")]
    items = list(pipe.map(good, batch_size=2, return_errors=True))
    assert isinstance(items[0], Result) and isinstance(items[1], UserError) and isinstance(items[2], Result)
    with pytest.raises(UserError):
        list(pipe.map(good, batch_size=2))


def test_map_refuses_a_batch_size_below_one(settings: Any) -> None:
    pipe, _ = _scripted(settings, [2])
    with pytest.raises(UserError, match="batch size"):
        list(pipe.map([Request("a")], batch_size=0))


def test_batch_cancel_ends_one_request_between_steps(settings: Any) -> None:
    pipe, _ = _scripted(settings, [5, 5])
    batch = pipe.batch(max_batch=2)
    cancel = threading.Event()
    batch.admit(Request("a"), key="a", cancel=cancel)
    batch.admit(Request("b"), key="b")
    batch.step()
    cancel.set()
    events = dict(batch.step())
    (result,) = [e for e in events["a"] if isinstance(e, Result)]
    assert result.finish_reason == "cancelled" and result.completion_tokens == 1
    assert batch.active == 1 and batch.free_slots == 1
    finished = []
    while batch.active:
        finished += [e for _, evs in batch.step() for e in evs if isinstance(e, Result)]
    assert [r.completion_tokens for r in finished] == [6]


def test_batch_refuses_another_model_and_full_slots(settings: Any) -> None:
    pipe, _ = _scripted(settings, [3])
    batch = pipe.batch(max_batch=1)
    with pytest.raises(ValueError, match="serves"):
        batch.admit(Request("a", model="paddleocr-vl"))
    batch.admit(Request("a"))
    with pytest.raises(RuntimeError, match="no free slot"):
        batch.admit(Request("b"))
    (key, events), = batch.cancel_all()
    assert isinstance(events[-1], Result) and batch.active == 0


# ------------------------------------------------------------------------------------ the real torch backend

def _page(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("model", ["deepseek-ocr", "paddleocr-vl"])
@pytest.mark.slow
def test_batched_answers_equal_single_runs_on_torch(settings: Any, model: str) -> None:
    pytest.importorskip("torch")
    pipe = Pipeline(load_settings(settings.config_path, {"backend": "torch", "device": "cpu"}))
    prompt = "<image>\nFree OCR." if model == "deepseek-ocr" else "<image>OCR:"
    mode = {"mode": "tiny"} if model == "deepseek-ocr" else {}
    requests = [Request(prompt, [_page(i, 40 + 24 * i, 64)], model=model,
                        overrides={"max_new_tokens": 3 + 2 * i, "ignore_eos": True, "logprobs": 2, **mode})
                for i in range(4)]
    requests.append(Request("Hello", model=model, overrides={"max_new_tokens": 5, "do_sample": True,
                                                             "temperature": 0.8, "seed": 3}))
    alone = [pipe.run(r) for r in requests]
    batched = list(pipe.map(requests, batch_size=3))
    for one, many in zip(alone, batched):
        assert many.token_ids == one.token_ids and many.text == one.text
        assert many.completion_tokens == one.completion_tokens and many.finish_reason == one.finish_reason
        np.testing.assert_allclose([t.logprob for t in many.logprobs or []],
                                   [t.logprob for t in one.logprobs or []], atol=2e-4)


@pytest.mark.slow
def test_batch_streams_text_deltas_that_join_to_the_text(settings: Any) -> None:
    pytest.importorskip("torch")
    pipe = Pipeline(load_settings(settings.config_path, {"backend": "torch", "device": "cpu"}))
    batch = pipe.batch(max_batch=2)
    for key in ("a", "b"):
        batch.admit(Request(f"Hello {key}", overrides={"max_new_tokens": 6, "ignore_eos": True}), key=key)
    text: dict[str, str] = {"a": "", "b": ""}
    results: dict[str, Result] = {}
    while batch.active:
        for key, events in batch.step():
            for event in events:
                if isinstance(event, TextDelta):
                    text[key] += event.text
                else:
                    results[key] = event
    assert {k: r.text for k, r in results.items()} == text
