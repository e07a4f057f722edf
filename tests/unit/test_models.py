"""The model registry (common/models/): one family per model, and the order in which sampling values apply.

Precedence of a sampling key: the model family's defaults, then config.toml, then a command-line flag, then a
request field. A value given anywhere is kept even when it equals a built-in default.
"""
from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.config import load_settings
from common.errors import UnknownModelError, UserError
from common.generation import GeneratedToken, GenerationOptions
from common.models import (FAMILIES, check_family_options, family_ids, family_of_model_type, get_family,
                           option_owner)
from common.pipeline import Pipeline, Request

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists_both_families_in_order() -> None:
    ids = family_ids()
    assert ids[:2] == ("deepseek-ocr", "paddleocr-vl") and len(set(ids)) == len(ids)
    assert "paddleocr-vl-1.5" in ids
    for model_id, family in FAMILIES.items():
        assert family.id == family.spec.model_id == model_id
        assert family.display_name and family.default_prompt
    with pytest.raises(UnknownModelError, match="known: deepseek-ocr, paddleocr-vl, "):
        get_family("gpt-9")


@pytest.mark.parametrize("model_id", list(FAMILIES))
def test_each_family_names_files_that_exist(model_id: str) -> None:
    family = get_family(model_id)
    for backend in ("torch_ocr", "mlx_ocr"):
        assert (ROOT / backend / f"{family.module}.py").is_file()
    assert callable(importlib.import_module(family.checkpoint_builder).build)


def test_family_reads_its_checkpoint(deepseek_tiny: Path, paddle_tiny: Path) -> None:
    for model_id, snapshot in (("deepseek-ocr", deepseek_tiny), ("paddleocr-vl", paddle_tiny)):
        family = get_family(model_id)
        raw = json.loads((snapshot / "config.json").read_text())
        assert family_of_model_type(raw["model_type"]) is family
        assert family.max_positions(snapshot / "config.json") > 0
        assert isinstance(family.config_class.from_file(snapshot / "config.json"), family.config_class)
    assert family_of_model_type("llama") is None


def test_options_belong_to_one_family() -> None:
    assert option_owner("mode").id == "deepseek-ocr" and option_owner("task").id == "paddleocr-vl"
    assert option_owner("temperature") is None
    check_family_options("paddleocr-vl", {"task": "table", "mode": None})
    with pytest.raises(UserError, match=r"^--task is a PaddleOCR-VL option; add --model paddleocr-vl$"):
        check_family_options("deepseek-ocr", {"task": "table"}, flag=lambda n: f"--{n}",
                             hint=lambda owner: f"add --model {owner.id}")
    with pytest.raises(UserError, match="mode is a DeepSeek-OCR option"):
        check_family_options("paddleocr-vl", {"mode": "tiny"})


def test_user_prompts() -> None:
    deepseek, paddle = get_family("deepseek-ocr"), get_family("paddleocr-vl")
    assert deepseek.user_prompt(None, 2, {}) == "<image>\n<image>\n<|grounding|>Convert the document to markdown."
    assert paddle.user_prompt(None, 1, {}) == "OCR:"
    assert paddle.user_prompt(None, 1, {"task": "table"}) == ""
    assert paddle.user_prompt("describe", 1, {}) == "describe"      # images go first without placeholders
    with pytest.raises(UserError, match="placeholder"):
        deepseek.user_prompt("describe", 1, {})
    with pytest.raises(UserError, match="not both"):
        paddle.user_prompt("describe", 1, {"task": "table"})
    with pytest.raises(UserError, match="nothing to do"):
        paddle.user_prompt(None, 0, {})


def test_server_names_come_from_the_families() -> None:
    from server.routes import MODEL_NAMES

    assert MODEL_NAMES == {family.id: family.display_name for family in FAMILIES.values()}
    assert MODEL_NAMES["deepseek-ocr"] == "DeepSeek-OCR" and MODEL_NAMES["paddleocr-vl"] == "PaddleOCR-VL"


# ------------------------------------------------------------------------------------------------ precedence
class _Recorder:
    """A `load_model` double whose model records the options of each call and stops at once."""

    backend, device, dtype = "scripted", "cpu", "float32"

    def __init__(self) -> None:
        self.options: list[GenerationOptions] = []

    def __call__(self, kind: str, config_path: Path, weights_path: Path, **_: Any) -> _Recorder:
        self.kind = kind
        return self

    def generate(self, inputs: Any, options: GenerationOptions, timings: Any,
                 cancel: threading.Event | None = None) -> Iterator[GeneratedToken]:
        self.options.append(options)
        yield GeneratedToken(options.stop_token_ids[0])


def _ngram(tmp_path: Path, snapshots: tuple[Path, Path], file_value: int | None, flags: dict[str, Any],
           request: dict[str, Any]) -> int:
    deepseek, paddle = snapshots
    config = tmp_path / "config.toml"
    text = (f'[models.entries.deepseek-ocr]\nmodel_dir = "{deepseek}"\n'
            f'[models.entries.paddleocr-vl]\nmodel_dir = "{paddle}"\n')
    if file_value is not None:
        text += f"[inference]\nno_repeat_ngram_size = {file_value}\n"
    config.write_text(text, encoding="utf-8")
    recorder = _Recorder()
    Pipeline(load_settings(config, flags), load_model=recorder).run(
        Request("hi", model="paddleocr-vl", overrides=request))
    return recorder.options[0].sampling.no_repeat_ngram_size


@pytest.fixture()
def snapshots(deepseek_tiny: Path, paddle_tiny: Path) -> tuple[Path, Path]:
    return deepseek_tiny, paddle_tiny


def test_unset_gives_the_model_default(tmp_path: Path, snapshots: tuple[Path, Path]) -> None:
    assert _ngram(tmp_path, snapshots, None, {}, {}) == 0          # PaddleOCR-VL: generation_config.json, no ban


def test_explicit_value_equal_to_the_builtin_default_is_kept(tmp_path: Path, snapshots: tuple[Path, Path]) -> None:
    assert _ngram(tmp_path, snapshots, None, {}, {"no_repeat_ngram_size": 20}) == 20
    assert _ngram(tmp_path, snapshots, None, {"no_repeat_ngram_size": "20"}, {}) == 20


def test_config_beats_model_default_flag_beats_config_request_beats_flag(
        tmp_path: Path, snapshots: tuple[Path, Path]) -> None:
    assert _ngram(tmp_path, snapshots, 7, {}, {}) == 7
    assert _ngram(tmp_path, snapshots, 7, {"no_repeat_ngram_size": "5"}, {}) == 5
    assert _ngram(tmp_path, snapshots, 7, {"no_repeat_ngram_size": "5"}, {"no_repeat_ngram_size": 3}) == 3


def test_deepseek_default_is_the_official_20_gram(tmp_path: Path, snapshots: tuple[Path, Path]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[models.entries.deepseek-ocr]\nmodel_dir = "{snapshots[0]}"\n', encoding="utf-8")
    recorder = _Recorder()
    Pipeline(load_settings(config, {}), load_model=recorder).run(Request("hi"))
    sampling = recorder.options[0].sampling
    assert (sampling.no_repeat_ngram_size, sampling.do_sample, sampling.temperature) == (20, False, 0.0)


def test_request_cannot_use_another_familys_option(tmp_path: Path, snapshots: tuple[Path, Path]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[models.entries.deepseek-ocr]\nmodel_dir = "{snapshots[0]}"\n', encoding="utf-8")
    with pytest.raises(UserError, match="task is a PaddleOCR-VL option"):
        Pipeline(load_settings(config, {}), load_model=_Recorder()).run(Request("hi", overrides={"task": "table"}))
