"""The pipeline (common/pipeline.py): options, stop handling, streaming text, usage, residency, backend choice.

Most tests drive the pipeline with a scripted backend (a `LoadedModel` that yields ids chosen by the test), on
the tiny real-layout snapshots, so expectations are independent of random weights. The last tests run the real
PyTorch backend end to end.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from common import pipeline as pipeline_module
from common.config import load_settings
from common.errors import UnknownModelError, UserError
from common.generation import GeneratedToken, GenerationOptions, TokenLogprob
from common.pipeline import Pipeline, Request, Result, TextDelta, choose_backend
from common.tokenizer import Tokenizer

DS_EOS, PV_EOS = 1, 2           # tokenizer / generation_config eos ids of the two checkpoints
TD, TD_END = 128821, 128822     # `<td>`, `</td>` in the real DeepSeek-OCR tokenizer


class ScriptedModel:
    """Yields `script` one id at a time, honouring the generate contract (stop ids, cap, cancel)."""

    backend, device, dtype = "scripted", "cpu", "float32"

    def __init__(self, kind: str, script: list[int]) -> None:
        self.kind, self.script = kind, script
        self.calls: list[tuple[Any, GenerationOptions]] = []
        self.closed = 0

    def generate(self, inputs: Any, options: GenerationOptions, timings: Any,
                 cancel: threading.Event | None = None) -> Iterator[GeneratedToken]:
        self.calls.append((inputs, options))
        try:
            for index, token_id in enumerate(self.script[:options.max_new_tokens]):
                if cancel is not None and cancel.is_set():
                    return
                top = tuple(TokenLogprob(token_id + k, -1.0 - k) for k in range(options.logprobs))
                yield GeneratedToken(token_id, -1.0 if options.logprobs else None, top)
                if token_id in options.stop_token_ids and not options.ignore_eos:
                    return
        finally:
            self.closed += 1


class Loader:
    """A `load_model` double that records each load and hands out ScriptedModels."""

    def __init__(self, script: list[int], delay_s: float = 0.0) -> None:
        self.script, self.delay_s = script, delay_s
        self.loads: list[str] = []
        self.models: dict[str, ScriptedModel] = {}

    def __call__(self, kind: str, config_path: Path, weights_path: Path, *, dtype: str, device: str) -> ScriptedModel:
        assert config_path.is_file() and weights_path.is_file()
        time.sleep(self.delay_s)
        self.loads.append(kind)
        self.models[kind] = ScriptedModel(kind, self.script)
        return self.models[kind]


@pytest.fixture()
def settings(tmp_path: Path, deepseek_tiny: Path, paddle_tiny: Path) -> Any:
    config = tmp_path / "config.toml"
    config.write_text(f'[models.entries.deepseek-ocr]\nmodel_dir = "{deepseek_tiny}"\n'
                      f'[models.entries.paddleocr-vl]\nmodel_dir = "{paddle_tiny}"\n', encoding="utf-8")
    return load_settings(config, {})


@pytest.fixture()
def tokenizer(deepseek_tiny: Path) -> Tokenizer:
    return Tokenizer.from_files(deepseek_tiny / "tokenizer.json")


def _events(pipe: Pipeline, request: Request, cancel: threading.Event | None = None) -> tuple[list[TextDelta], Result]:
    events = list(pipe.stream(request, cancel))
    assert isinstance(events[-1], Result) and all(isinstance(e, TextDelta) for e in events[:-1])
    return events[:-1], events[-1]


@pytest.mark.slow
def test_stop_id_ends_the_answer_and_is_counted_in_usage(settings: Any, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    pipe = Pipeline(settings, load_model=Loader(ids + [DS_EOS, 5, 6]))
    deltas, result = _events(pipe, Request("Say hello"))
    assert result.finish_reason == "stop"
    assert result.token_ids == ids and result.text == "Hello world"
    assert result.completion_tokens == len(ids) + 1  # OpenAI/vLLM usage: the eos was generated too
    assert "".join(d.text for d in deltas) == "Hello world"
    assert result.prompt_tokens == 1 + len(tokenizer.encode("Say hello"))  # BOS + text
    assert (result.model, result.backend, result.logprobs) == ("deepseek-ocr", "scripted", None)


@pytest.mark.slow
def test_cap_gives_length(settings: Any, tokenizer: Tokenizer) -> None:
    loader = Loader(tokenizer.encode("one two three four five six"))
    pipe = Pipeline(settings, load_model=loader)
    result = pipe.run(Request("x", overrides={"max_new_tokens": 3}))
    assert (result.finish_reason, result.completion_tokens, len(result.token_ids)) == ("length", 3, 3)
    assert loader.models["deepseek-ocr"].calls[0][1].max_new_tokens == 3


def test_ignore_eos_keeps_generating_and_keeps_the_ids(settings: Any) -> None:
    loader = Loader([100, DS_EOS, 101, DS_EOS])
    result = Pipeline(settings, load_model=loader).run(Request("x", overrides={"ignore_eos": True}))
    assert result.token_ids == [100, DS_EOS, 101, DS_EOS] and result.finish_reason == "length"
    assert loader.models["deepseek-ocr"].calls[0][1].ignore_eos is True


def test_multibyte_character_split_over_tokens_streams_whole(settings: Any, tokenizer: Tokenizer) -> None:
    text = "a🦜b😀"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # the emoji really are split over several byte-level tokens
    deltas, result = _events(Pipeline(settings, load_model=Loader(ids + [DS_EOS])), Request("x"))
    pieces = [d.text for d in deltas]
    assert "".join(pieces) == text == result.text
    assert not any("\ufffd" in p for p in pieces)
    assert "🦜" in pieces or any(p.startswith("🦜") or p.endswith("🦜") for p in pieces)


@pytest.mark.slow
def test_cancel_between_tokens(settings: Any, tokenizer: Tokenizer) -> None:
    loader = Loader(tokenizer.encode(" word" * 40))
    pipe = Pipeline(settings, load_model=loader)
    cancel = threading.Event()
    stream = pipe.stream(Request("x"), cancel)
    first = next(stream)
    assert isinstance(first, TextDelta)
    cancel.set()
    rest = list(stream)
    result = rest[-1]
    assert isinstance(result, Result) and result.finish_reason == "cancelled"
    assert result.completion_tokens < 40
    assert loader.models["deepseek-ocr"].closed == 1  # the backend's generator was closed, freeing its cache


def test_closing_the_stream_closes_the_backend_generator(settings: Any, tokenizer: Tokenizer) -> None:
    loader = Loader(tokenizer.encode(" word" * 40))
    stream = Pipeline(settings, load_model=loader).stream(Request("x"))
    next(stream)
    stream.close()
    assert loader.models["deepseek-ocr"].closed == 1


def test_logprobs_one_per_generated_token_including_stop(settings: Any) -> None:
    pipe = Pipeline(settings, load_model=Loader([100, 101, DS_EOS]))
    deltas, result = _events(pipe, Request("x", overrides={"logprobs": 2}))
    assert [t.token_id for t in result.logprobs] == [100, 101, DS_EOS]
    assert [len(t.top_logprobs) for t in result.logprobs] == [2, 2, 2]
    assert [t.token_id for d in deltas for t in d.tokens] == [100, 101]


def test_deepseek_options_reach_the_backend(settings: Any) -> None:
    loader = Loader([DS_EOS])
    pipe = Pipeline(settings, load_model=loader)
    pipe.run(Request("x"))
    pipe.run(Request("x", overrides={"repetition_guard": True, "temperature": 0.5, "do_sample": True,
                                     "seed": 7, "use_cache": False}))
    (_, plain), (_, guarded) = loader.models["deepseek-ocr"].calls
    assert plain.stop_token_ids == (DS_EOS,) and plain.use_cache is True
    assert (plain.sampling.no_repeat_ngram_size, plain.sampling.ngram_window) == (20, 0)  # official infer()
    assert (guarded.sampling.no_repeat_ngram_size, guarded.sampling.ngram_window) == (30, 90)
    assert guarded.sampling.ngram_exempt_ids == (TD, TD_END)
    assert (guarded.sampling.do_sample, guarded.sampling.temperature, guarded.sampling.seed) == (True, 0.5, 7)
    assert guarded.use_cache is False


@pytest.mark.parametrize("overrides, image_tokens", [
    ({"mode": "tiny"}, 73),                                            # RULES.md 5: no crop 512
    ({"mode": "small"}, 111),                                          # no crop 640
    ({"base_size": 1024, "image_size": 640, "crop_mode": True}, 273),  # small page: global view only
])
def test_deepseek_image_modes_set_the_image_token_count(settings: Any, overrides: dict, image_tokens: int) -> None:
    loader = Loader([DS_EOS])
    image = Image.new("RGB", (320, 240), (250, 250, 250))
    Pipeline(settings, load_model=loader).run(Request("<image>\nFree OCR.", [image], overrides=overrides))
    inputs, _ = loader.models["deepseek-ocr"].calls[0]
    assert int((inputs.input_ids == 128815).sum()) == image_tokens
    assert inputs.input_ids[0] == 0  # BOS


def test_deepseek_placeholder_mismatch_is_a_user_error(settings: Any) -> None:
    with pytest.raises(UserError, match="placeholder"):
        Pipeline(settings, load_model=Loader([DS_EOS])).run(Request("Free OCR.", [Image.new("RGB", (8, 8))]))


def test_paddle_defaults_prompt_forms_and_task(settings: Any, paddle_tiny: Path) -> None:
    loader = Loader([PV_EOS])
    pipe = Pipeline(settings, load_model=loader)
    image = Image.new("RGB", (56, 56), (10, 20, 30))
    pipe.run(Request("<image>\nOCR:", [image], model="paddleocr-vl"))
    pipe.run(Request("OCR:", [image], model="paddleocr-vl"))
    pipe.run(Request("", [image], model="paddleocr-vl", overrides={"task": "table"}))
    (a, options), (b, _), (table, _) = loader.models["paddleocr-vl"].calls
    # Generation defaults of generation_config.json: greedy, no n-gram ban, stop at eos 2.
    assert PV_EOS in options.stop_token_ids and options.sampling.no_repeat_ngram_size == 0
    assert a.input_ids.tolist() == b.input_ids.tolist()  # leading <image> is where the template puts it anyway
    tok = Tokenizer.from_files(paddle_tiny / "tokenizer.json")
    assert tok.decode(table.input_ids.tolist()).endswith("<|IMAGE_END|>Table Recognition:\nAssistant: ")


def test_paddle_explicit_sampling_value_wins(settings: Any) -> None:
    loader = Loader([PV_EOS])
    Pipeline(settings, load_model=loader).run(Request("hi", model="paddleocr-vl",
                                                      overrides={"no_repeat_ngram_size": 5}))
    assert loader.models["paddleocr-vl"].calls[0][1].sampling.no_repeat_ngram_size == 5


def test_stage_timings_are_reported(settings: Any) -> None:
    image = Image.new("RGB", (64, 64))
    result = Pipeline(settings, load_model=Loader([DS_EOS])).run(Request("<image>\nx", [image]))
    for stage in ("vision.prepare_inputs", "prompt.render", "prompt.build_tokens"):
        assert stage in result.timings_ms and result.timing_calls[stage] == 1
    assert result.timings_ms["vision.prepare_inputs"] > 0


def test_bad_overrides_are_user_errors(settings: Any) -> None:
    pipe = Pipeline(settings, load_model=Loader([DS_EOS]))
    with pytest.raises(UserError, match="max_new_tokens"):
        pipe.run(Request("x", overrides={"max_new_tokens": 0}))
    with pytest.raises(UserError, match="fixed when the model loads"):
        pipe.run(Request("x", overrides={"device": "cuda"}))
    with pytest.raises(UserError, match="logprobs"):
        pipe.run(Request("x", overrides={"logprobs": -1}))
    with pytest.raises(UserError, match="unknown option"):
        pipe.run(Request("x", overrides={"bogus": 1}))
    with pytest.raises(UnknownModelError):
        pipe.run(Request("x", model="gpt-9"))


def test_lru_residency(settings: Any) -> None:
    loader = Loader([DS_EOS])
    one = Pipeline(settings, max_resident=1, load_model=loader)
    one.load("deepseek-ocr")
    one.load("paddleocr-vl")
    assert one.loaded_models() == ["paddleocr-vl"]
    two = Pipeline(settings, max_resident=2, load_model=loader)
    two.load("deepseek-ocr")
    two.load("paddleocr-vl")
    two.load("deepseek-ocr")  # now the most recently used
    assert two.loaded_models() == ["paddleocr-vl", "deepseek-ocr"]
    assert loader.loads == ["deepseek-ocr", "paddleocr-vl", "deepseek-ocr", "paddleocr-vl"]
    assert two.tokenizer("deepseek-ocr").eos_id == DS_EOS


def test_concurrent_loads_load_once(settings: Any) -> None:
    loader = Loader([DS_EOS], delay_s=0.2)
    pipe = Pipeline(settings, load_model=loader)
    threads = [threading.Thread(target=pipe.load, args=("deepseek-ocr",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.loads == ["deepseek-ocr"]


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "_on_apple_silicon", lambda: False)
    assert choose_backend("auto") == "torch"
    monkeypatch.setattr(pipeline_module, "_on_apple_silicon", lambda: True)
    monkeypatch.setattr(pipeline_module, "_mlx_has_metal", lambda: True)
    assert choose_backend("auto") == "mlx"
    assert choose_backend("torch") == "torch"


def test_missing_backend_package_names_the_extra(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline_module.importlib.util.find_spec
    monkeypatch.setattr(pipeline_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlx" else real(name, *a))
    pipe = Pipeline(load_settings(settings.config_path, {"backend": "mlx"}))
    with pytest.raises(UserError, match=r"pip install 'deepseek-ocr\[mlx\]'"):
        pipe.load("deepseek-ocr")


# ---------------------------------------------------------------------------------------- real backend
@pytest.mark.parametrize("model, prompt, with_image", [
    ("deepseek-ocr", "<image>\nFree OCR.", True), ("deepseek-ocr", "Hello", False),
    ("paddleocr-vl", "OCR:", True), ("paddleocr-vl", "Hello", False),
])
@pytest.mark.slow
def test_torch_backend_end_to_end(settings: Any, model: str, prompt: str, with_image: bool) -> None:
    pipe = Pipeline(load_settings(settings.config_path, {"backend": "torch", "device": "cpu"}))
    images = [Image.new("RGB", (96, 64), (240, 240, 240))] if with_image else []
    size = {"mode": "tiny"} if model == "deepseek-ocr" else {}  # 512 px views keep SAM cheap on a CPU
    request = Request(prompt, images, model=model, overrides={"max_new_tokens": 4, "logprobs": 1, **size})
    deltas, result = _events(pipe, request)
    assert (result.backend, result.device, result.model) == ("torch", "cpu", model)
    assert 1 <= result.completion_tokens <= 4 and result.finish_reason in ("stop", "length")
    assert "".join(d.text for d in deltas) == result.text
    assert len(result.logprobs) == result.completion_tokens
    assert result.timings_ms["decode.prefill"] > 0
    # Without the KV cache the same greedy ids must come out.
    again = pipe.run(Request(prompt, images, model=model,
                             overrides={"max_new_tokens": 4, "use_cache": False, **size}))
    assert again.token_ids == result.token_ids


@pytest.mark.mlx
@pytest.mark.parametrize("model", ["deepseek-ocr", "paddleocr-vl"])
@pytest.mark.slow
def test_mlx_and_torch_backends_agree(settings: Any, model: str) -> None:
    pytest.importorskip("mlx.core")
    ids = {}
    for backend in ("torch", "mlx"):
        pipe = Pipeline(load_settings(settings.config_path, {"backend": backend, "device": "cpu"}))
        result = pipe.run(Request("Hello", model=model, overrides={"max_new_tokens": 4, "ignore_eos": True}))
        assert result.backend == backend
        ids[backend] = result.token_ids
    assert ids["mlx"] == ids["torch"]


def test_non_rgb_images_are_converted_like_the_official_loader(settings: Any) -> None:
    loader = Loader([DS_EOS])
    pipe = Pipeline(settings, load_model=loader)
    rgba = Image.new("RGBA", (64, 48), (10, 200, 30, 0))  # fully transparent: alpha dropped, not composited
    pipe.run(Request("<image>\nx", [rgba], overrides={"mode": "tiny"}))
    pipe.run(Request("<image>\nx", [rgba.convert("RGB")], overrides={"mode": "tiny"}))
    (a, _), (b, _) = loader.models["deepseek-ocr"].calls
    assert (a.images[0].global_view == b.images[0].global_view).all()


def test_context_limit_refuses_long_prompts_and_shortens_the_cap() -> None:
    from common.errors import UserError
    from common.generation import GenerationOptions
    from common.pipeline import _fit_context

    options = GenerationOptions(max_new_tokens=512)
    assert _fit_context(options, 100, 8192).max_new_tokens == 512
    assert _fit_context(options, 8000, 8192).max_new_tokens == 192
    assert _fit_context(options, 100, None).max_new_tokens == 512
    with pytest.raises(UserError, match="8192"):
        _fit_context(options, 8192, 8192)
