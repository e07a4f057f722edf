"""The batched engine (torch_ocr/engine.py, mlx_ocr/engine.py) on the tiny real-layout checkpoints, float32.

Every row of a batch must give the ids of the same request run alone (the single-sequence path, itself held to
the references by the parity tests), and its raw log-probabilities within float32 rounding: batched GEMMs block
differently from a batch of one, so the last bits may differ (README, "Batching"). Covered: ragged prompt lengths,
different max_new_tokens, a row stopping early on a stop id, a row aborted mid-way, a request admitted while
others decode, a free row in the middle of the batch, sampled rows with seeds, penalties and n-gram bans per row,
a row decoding without a KV cache, and the cache growing while slots hold keys.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common import deepseek_ocr as cd
from common import deepseek_ocr2 as cd2
from common import glm_ocr as glm
from common import paddleocr_vl as pv
from common.generation import GenerationOptions
from common.models import get_family
from common.sampling import SamplingOptions
from common.timing import Timings
from common.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

LOGPROB_ATOL = 2e-4


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


class Env:
    """One model of one backend with a way to build its inputs from (prompt, images)."""

    def __init__(self, backend: str, model: str, snapshot: Path) -> None:
        self.backend, self.name = backend, model
        if backend == "mlx":
            import mlx.core as mx
            mx.set_default_device(mx.cpu)
        module = __import__(f"{backend}_ocr.{get_family(model).module}", fromlist=["load"])
        self.model = module.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        engine_module = __import__(f"{backend}_ocr.engine", fromlist=["Engine"])
        generate_module = __import__(f"{backend}_ocr.generate", fromlist=["generate"])
        self.Engine, self.generate = engine_module.Engine, generate_module.generate
        if model == "deepseek-ocr":
            self.tokenizer = tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json",
                                                              snapshot / "tokenizer_config.json")
            self.build = lambda text, images: cd.build_inputs(
                f"{'<image>' * len(images)}\n{text}", images, tokenizer, base_size=512, image_size=512,
                crop_mode=False)
        elif model == "deepseek-ocr-2":
            self.tokenizer = tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json",
                                                              snapshot / "tokenizer_config.json")
            self.build = lambda text, images: cd2.build_inputs(f"{'<image>' * len(images)}\n{text}", images,
                                                               tokenizer)
        else:
            tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
            template = pv.load_chat_template(snapshot)
            pre = __import__("json").loads((snapshot / "preprocessor_config.json").read_text())
            builder = glm.build_inputs if model == "glm-ocr" else pv.build_inputs
            self.build = lambda text, images: builder(
                "<image>" * len(images) + text, images, tokenizer, template, pre)


def _params() -> list[Any]:
    out = []
    # MLX on the CPU is slow: its engine (shared by every model) runs on the two first models; the newer ones are
    # held to torch in their own MLX parity files, and their engine rows run on torch.
    for backend, models in (("torch", ("deepseek-ocr", "paddleocr-vl", "deepseek-ocr-2", "glm-ocr")),
                            ("mlx", ("deepseek-ocr", "paddleocr-vl"))):
        for model in models:
            marks = [pytest.mark.mlx] if backend == "mlx" else []
            out.append(pytest.param((backend, model), id=f"{backend}-{model}", marks=marks))
    return out


@pytest.fixture(scope="module", params=_params())
def env(request: pytest.FixtureRequest) -> Env:
    backend, model = request.param
    pytest.importorskip("torch" if backend == "torch" else "mlx.core")
    fixture = {"deepseek-ocr": "deepseek_tiny", "paddleocr-vl": "paddle_tiny", "deepseek-ocr-2": "deepseek2_tiny",
               "glm-ocr": "glm_tiny"}
    snapshot = request.getfixturevalue(fixture[model])
    try:
        return Env(backend, model, snapshot)
    except ImportError as error:  # pragma: no cover - a backend without an engine yet
        pytest.skip(str(error))


@dataclasses.dataclass
class Job:
    name: str
    inputs: Any
    options: GenerationOptions
    add_at: int = 0                 # step index at which the request is added
    abort_after: int | None = None  # abort once it has this many tokens


def _options(max_new: int, **sampling: Any) -> GenerationOptions:
    base = dict(no_repeat_ngram_size=0)
    base.update(sampling)
    return GenerationOptions(max_new_tokens=max_new, logprobs=3, sampling=SamplingOptions(**base))


def _alone(env: Env, job: Job) -> list[Any]:
    tokens = []
    for token in env.generate(env.model, job.inputs, job.options, Timings()):
        tokens.append(token)
        if job.abort_after is not None and len(tokens) == job.abort_after:
            break
    return tokens


def _batched(env: Env, jobs: list[Job], max_batch: int) -> dict[str, list[Any]]:
    engine = env.Engine(env.model, max_batch)
    out: dict[str, list[Any]] = {job.name: [] for job in jobs}
    slot_of: dict[int, Job] = {}
    pending = sorted(jobs, key=lambda j: j.add_at)
    step = 0
    while pending or engine.active:
        while pending and pending[0].add_at <= step and engine.free_slots:
            job = pending.pop(0)
            slot_of[engine.add(job.inputs, job.options, Timings())] = job
        for item in engine.step():
            job = slot_of[item.slot]
            out[job.name].append(item.token)
            if item.finished:
                del slot_of[item.slot]
            elif job.abort_after is not None and len(out[job.name]) == job.abort_after:
                engine.abort(item.slot)
                del slot_of[item.slot]
        step += 1
        assert step < 500
    return out


def _check(env: Env, jobs: list[Job], max_batch: int) -> dict[str, list[Any]]:
    batched = _batched(env, jobs, max_batch)
    for job in jobs:
        alone, rows = _alone(env, job), batched[job.name]
        assert [t.token_id for t in rows] == [t.token_id for t in alone], job.name
        np.testing.assert_allclose([t.logprob for t in rows], [t.logprob for t in alone], atol=LOGPROB_ATOL,
                                   err_msg=job.name)
        for got, want in zip(rows, alone):
            assert [p.token_id for p in got.top_logprobs] == [p.token_id for p in want.top_logprobs], job.name
    return batched


def test_ragged_rows_equal_their_single_runs(env: Env) -> None:
    jobs = [
        Job("wide", env.build("Free OCR.", [_image(96, 48, 1)]), _options(9)),
        Job("text", env.build("Say something", []), _options(5)),
        Job("two", env.build("Compare.", [_image(40, 70, 2), _image(64, 64, 3)]), _options(12)),
    ]
    batched = _check(env, jobs, max_batch=4)
    assert {name: len(tokens) for name, tokens in batched.items()} == {"wide": 9, "text": 5, "two": 12}


def test_stop_abort_admission_and_free_rows(env: Env) -> None:
    """Row 0 stops early on a stop id; row 1 is aborted; a request joins while the others decode and takes the
    freed slot, leaving a free row in the middle of later steps."""
    first = env.build("Free OCR.", [_image(64, 32, 4)])
    probe = [t.token_id for t in env.generate(env.model, first, _options(8), Timings())]
    stop = dataclasses.replace(_options(16), stop_token_ids=(probe[3],))
    jobs = [
        Job("stops", first, stop),
        Job("aborted", env.build("Read.", [_image(32, 64, 5)]), _options(16), abort_after=4),
        Job("long", env.build("Read it all.", [_image(48, 48, 6)]), _options(14)),
        Job("late", env.build("Late.", []), _options(6), add_at=3),
        Job("later", env.build("Later.", [_image(32, 32, 7)]), _options(5), add_at=7),
    ]
    batched = _check(env, jobs, max_batch=3)
    assert len(batched["stops"]) == probe.index(probe[3]) + 1
    assert len(batched["aborted"]) == 4


def test_per_row_sampling_rules(env: Env) -> None:
    """Seeded sampling, repetition penalty, the n-gram ban and a cache-off row, each in its own row."""
    prompt = env.build("Free OCR.", [_image(64, 48, 8)])
    jobs = [
        Job("sampled", prompt, _options(10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)),
        Job("sampled2", prompt, _options(10, do_sample=True, temperature=1.3, seed=11)),
        Job("penalty", prompt, _options(10, repetition_penalty=1.5)),
        Job("ngram", env.build("Text.", []), _options(12, no_repeat_ngram_size=2)),
        Job("no_cache", env.build("Other.", [_image(32, 32, 9)]),
            dataclasses.replace(_options(6), use_cache=False)),
    ]
    _check(env, jobs, max_batch=5)


def test_cache_grows_while_slots_hold_keys(env: Env) -> None:
    """A long request admitted after a short one makes the cache grow; the held keys must survive the copy."""
    engine_module = __import__(f"{env.backend}_ocr.engine", fromlist=["CAPACITY_STEP"])
    short = Job("short", env.build("Hi.", []), _options(6))
    long = Job("long", env.build("Free OCR.", [_image(64, 64, 10)]),
               dataclasses.replace(_options(engine_module.CAPACITY_STEP + 4), ignore_eos=True), add_at=2)
    _check(env, [short, long], max_batch=2)


def test_single_slot_engine_refuses_a_second_request(env: Env) -> None:
    engine = env.Engine(env.model, 1)
    engine.add(env.build("Hi.", []), _options(3), Timings())
    assert engine.free_slots == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        engine.add(env.build("Hi.", []), _options(3), Timings())
    engine.abort(engine.active[0])
    assert engine.free_slots == 1 and engine.step() == []


def test_requests_added_together_share_one_vision_pass(env: Env) -> None:
    """`add_many`: views of the same size across prompts encoded stacked (tiled, untiled, two images, none),
    each row still equal to its single run; a failing request frees every slot of the call."""
    extra = {}
    if env.name == "deepseek-ocr":  # a tiled prompt too: tiles of one size, global views of another
        extra["tiled"] = cd.build_inputs("<image>\nFree OCR.", [_image(200, 90, 12)], env.tokenizer,
                                         base_size=512, image_size=640, crop_mode=True)
    if env.name == "deepseek-ocr-2":  # 768 px tiles (144 queries) beside 1024 px global views (256)
        extra["tiled"] = cd2.build_inputs("<image>\nFree OCR.", [_image(1000, 300, 12)], env.tokenizer)
    prompts = {"a": env.build("Free OCR.", [_image(64, 48, 11)]), "b": env.build("Text only.", []),
               "c": env.build("Two.", [_image(48, 64, 13), _image(40, 40, 14)]), **extra}
    batched = env.model.encode_images_batch(list(prompts.values()))
    for (name, inputs), embeds in zip(prompts.items(), batched):
        alone = env.model.encode_images(inputs)
        if alone is None:
            assert embeds is None, name
        else:
            np.testing.assert_allclose(np.array(embeds.tolist()), np.array(alone.tolist()), atol=1e-4, err_msg=name)
    engine = env.Engine(env.model, len(prompts) + 1)
    timings = [Timings() for _ in prompts]
    slots = engine.add_many([(inputs, _options(6), t) for inputs, t in zip(prompts.values(), timings)])
    assert slots == list(range(len(prompts)))
    assert all(t.counts["vision.compute_embeddings"] == 1 for t in timings)
    rows: dict[int, list[Any]] = {slot: [] for slot in slots}
    while engine.active:
        for item in engine.step():
            rows[item.slot].append(item.token)
    for slot, inputs in zip(slots, prompts.values()):
        alone = list(env.generate(env.model, inputs, _options(6), Timings()))
        assert [t.token_id for t in rows[slot]] == [t.token_id for t in alone]
    # image placeholders without their image: the prefill refuses it
    if env.name.startswith("deepseek-ocr"):
        broken = dataclasses.replace(prompts["a"], images=())
    else:
        broken = dataclasses.replace(prompts["a"], pixel_values=prompts["a"].pixel_values[:0],
                                     image_grid_thw=prompts["a"].image_grid_thw[:0])
    with pytest.raises(ValueError, match="image"):
        engine.add_many([(prompts["b"], _options(3), Timings()), (broken, _options(3), Timings())])
    assert engine.free_slots == engine.max_batch
