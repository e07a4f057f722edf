"""config.toml: first-run defaults, precedence flag > file > default, validation messages, per-request overrides."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from common import config
from common.config import InferenceSettings, ModelEntry, ServerSettings, load_settings
from common.errors import ConfigError, UnknownModelError, UserError
from common.registry import MODEL_IDS


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """An empty config.toml (an explicit --config must exist): the built-in defaults until a test writes it."""
    path = tmp_path / "config.toml"
    path.touch()
    return path


# ------------------------------------------------------------------------------------------- first run, defaults
def test_first_run_writes_commented_defaults_that_read_back_equal(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    expected_path = tmp_path / "xdg" / "deepseek-ocr" / "config.toml"
    if sys.platform.startswith("linux"):
        assert config.default_config_path() == expected_path
    else:  # elsewhere XDG may not apply: never touch the real user's config
        monkeypatch.setattr(config, "default_config_path", lambda: expected_path)
    path = config.default_config_path()
    assert not path.exists()
    settings = load_settings()
    assert path.exists() and settings.config_path == path
    text = path.read_text(encoding="utf-8")
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 20
    # The written file parses to exactly the dataclass defaults (two independent statements of them).
    assert settings.inference == InferenceSettings()
    assert settings.server == ServerSettings()
    assert settings.active_model == "deepseek-ocr"
    assert settings.models == {model_id: ModelEntry() for model_id in MODEL_IDS}


def test_written_defaults_spell_out_every_key(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "xdg" / "config.toml"
    monkeypatch.setattr(config, "default_config_path", lambda: cfg)
    load_settings()
    text = cfg.read_text(encoding="utf-8")
    for key in (*config.INFERENCE_RULES, *config.SERVER_RULES):
        assert f"\n{key} = " in text or f"\n# {key} = " in text, key
    assert 'active = "deepseek-ocr"' in text
    assert "[models.entries.deepseek-ocr]" in text and "[models.entries.paddleocr-vl]" in text
    assert "no_repeat_ngram_size = 20" in text and "max_request_bytes = 52428800" in text


def test_explicit_missing_path_is_an_error_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "mine.toml"
    with pytest.raises(ConfigError, match=r"--config: .*mine\.toml does not exist"):
        load_settings(path)
    with pytest.raises(ConfigError, match=r"^config: "):
        load_settings(path, spell=config.keyword_spelling)
    assert not path.exists() and not path.parent.exists()


def test_user_file_is_never_rewritten(cfg: Path) -> None:
    original = b"# my notes\n[inference]\nmax_new_tokens   =   64  # spacing kept\n\n[server]\nport=9001\n"
    cfg.write_bytes(original)
    before = os.stat(cfg).st_mtime_ns
    settings = load_settings(cfg, {"max_new_tokens": 8, "port": 1234})
    assert settings.inference.max_new_tokens == 8
    assert cfg.read_bytes() == original and os.stat(cfg).st_mtime_ns == before
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]  # no temp file left behind


def test_empty_file_means_all_defaults(cfg: Path) -> None:
    settings = load_settings(write(cfg, ""))
    assert settings.inference == InferenceSettings() and settings.server == ServerSettings()


# ------------------------------------------------------------------------------------------- precedence
def test_precedence_flag_over_file_over_default(cfg: Path) -> None:
    write(cfg, '[inference]\nmax_new_tokens = 100\ntemperature = 0.7\n[server]\nport = 9000\nhost = "127.0.0.1"\n')
    settings = load_settings(cfg, {"max_new_tokens": 7, "port": None, "top_k": 5})
    assert settings.inference.max_new_tokens == 7          # flag beats the file
    assert settings.inference.temperature == 0.7           # file beats the default
    assert settings.inference.top_k == 5                   # flag beats the default
    assert settings.inference.top_p is None                # unset: the model family supplies it
    assert settings.server.port == 9000                    # a None flag is "not given"
    assert settings.server.host == "127.0.0.1"


def test_flags_accept_command_line_strings(cfg: Path) -> None:
    flags = {"crop_mode": "false", "temperature": "0.25", "seed": "42", "use_cache": "true", "base_size": "512"}
    inference = load_settings(cfg, flags).inference
    assert (inference.crop_mode, inference.temperature, inference.seed) == (False, 0.25, 42)
    assert (inference.use_cache, inference.base_size) == (True, 512)


def test_model_flag_selects_active_model_and_paths_apply_to_it(cfg: Path, tmp_path: Path) -> None:
    write(cfg, '[models]\nactive = "deepseek-ocr"\n[models.entries.paddleocr-vl]\nweights = "w/model.safetensors"\n')
    settings = load_settings(cfg, {"model": "paddleocr-vl", "tokenizer": str(tmp_path / "tok.json")})
    assert settings.active_model == "paddleocr-vl"
    entry = settings.entry()
    assert entry.tokenizer == tmp_path / "tok.json"
    assert entry.weights == tmp_path / "w" / "model.safetensors"  # relative to the config file
    assert settings.models["deepseek-ocr"] == ModelEntry()


def test_model_dir_flag_replaces_every_file_path(cfg: Path, tmp_path: Path) -> None:
    write(cfg, '[models.entries.deepseek-ocr]\nweights = "/elsewhere/w.safetensors"\nconfig = "/elsewhere/c.json"\n')
    entry = load_settings(cfg, {"model_dir": str(tmp_path / "snap")}).entry()
    assert entry == ModelEntry(model_dir=tmp_path / "snap")
    entry = load_settings(cfg, {"model_config": str(tmp_path / "c.json")}).entry()
    assert entry.config == tmp_path / "c.json" and entry.weights == Path("/elsewhere/w.safetensors")


def test_file_paths_expand_home(cfg: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write(cfg, '[models.entries.deepseek-ocr]\nmodel_dir = "~/models/ds"\n')
    assert load_settings(cfg).entry("deepseek-ocr").model_dir == tmp_path / "home" / "models" / "ds"


# ------------------------------------------------------------------------------------------- bad files
BAD_FILES = [
    ("[inference\nx = 1\n", ["invalid TOML"]),
    ("[inference]\nfoo = 1\n", ["[inference] foo", "max_new_tokens"]),
    ("[inference]\ntop_p = 2.0\n", ["[inference] top_p", "> 0 and <= 1"]),
    ("[inference]\nmax_new_tokens = \"many\"\n", ["[inference] max_new_tokens", "integer >= 1"]),
    ("[inference]\ncrop_mode = 1\n", ["[inference] crop_mode", "true | false"]),
    ("[inference]\ndevice = \"gpu\"\n", ["[inference] device", "auto | cpu | cuda | metal"]),
    ("[inference]\nbackend = \"jax\"\n", ["[inference] backend", "auto | torch | mlx"]),
    ("[inference]\ndtype = \"int8\"\n", ["[inference] dtype", "float32 | bfloat16 | float16"]),
    ("[inference]\ntemplate = \"chatml\"\n", ["[inference] template", "plain"]),
    ("[inference]\nseed = -1\n", ["[inference] seed", "integer from 0"]),
    ("[server]\nport = 70000\n", ["[server] port", "0 to 65535"]),
    ("[server]\nqueue_size = 0\n", ["[server] queue_size", ">= 1"]),
    ("[server]\nbogus = true\n", ["[server] bogus", "allowed: host, port"]),
    ("[models]\nactive = \"gpt-4\"\n", ["[models] active", "deepseek-ocr | paddleocr-vl"]),
    ("[models.entries.llama]\nmodel_dir = \"x\"\n", ["[models.entries.llama]", "deepseek-ocr | paddleocr-vl"]),
    ("[models.entries.paddleocr-vl-1.5]\nmodel_dir = \"x\"\n",
     ["[models.entries.paddleocr-vl-1]", 'needs quotes in TOML: [models.entries."paddleocr-vl-1.5"]']),
    ("[models.entries.deepseek-ocr]\nweight = \"x\"\n", ["[models.entries.deepseek-ocr] weight", "model_dir"]),
    ("[models.entries.deepseek-ocr]\nweights = 3\n", ["[models.entries.deepseek-ocr] weights", "path"]),
    ("[extra]\nx = 1\n", ["unknown key extra", "inference"]),
    ("inference = 3\n", ["[inference] must be a table"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD_FILES, ids=[t.splitlines()[0] for t, _ in BAD_FILES])
def test_bad_config_names_file_key_and_allowed(cfg: Path, text: str, needles: list[str]) -> None:
    write(cfg, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert str(cfg) in message
    for needle in needles:
        assert needle in message


# ------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"top_p": 2}, "--top-p"),
        ({"max_new_tokens": "lots"}, "--max-new-tokens"),
        ({"device": "tpu"}, "--device"),
        ({"crop_mode": "maybe"}, "--crop-mode"),
        ({"port": -1}, "--port"),
        ({"model_dir": ""}, "--model-dir"),
    ],
)
def test_bad_flag_value_is_a_user_error_naming_the_flag(cfg: Path, flags: dict, needle: str) -> None:
    with pytest.raises(UserError) as caught:
        load_settings(cfg, flags)
    assert not isinstance(caught.value, ConfigError)
    assert str(caught.value).startswith(needle)


def test_unknown_model_flag(cfg: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"--model: unknown model 'x' \(known: deepseek-ocr, paddleocr-vl"):
        load_settings(cfg, {"model": "x"})


def test_unknown_flag_name_is_a_programming_error(cfg: Path) -> None:
    with pytest.raises(TypeError, match="prompt"):
        load_settings(cfg, {"prompt": "hi"})


def test_entry_of_unknown_model(cfg: Path) -> None:
    with pytest.raises(UnknownModelError):
        load_settings(cfg).entry("nope")


# ------------------------------------------------------------------------------------------- overrides
def test_with_overrides_validates_and_leaves_the_original() -> None:
    base = InferenceSettings(max_new_tokens=100)
    changed = base.with_overrides({"max_new_tokens": 5, "temperature": 0.5, "seed": None})
    assert (changed.max_new_tokens, changed.temperature, changed.seed) == (5, 0.5, None)
    assert base.max_new_tokens == 100
    with pytest.raises(UserError) as caught:
        base.with_overrides({"top_p": 0})
    assert caught.value.param == "top_p" and "> 0 and <= 1" in str(caught.value)
    with pytest.raises(UserError) as caught:
        base.with_overrides({"max_tokens": 5})
    assert caught.value.param == "max_tokens"
    with pytest.raises(UserError):
        base.with_overrides({"do_sample": 1})      # 1 is a number, not a boolean
    with pytest.raises(UserError):
        base.with_overrides({"max_new_tokens": 2.5})


def test_sampling_options_follow_the_settings() -> None:
    settings = InferenceSettings(do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1,
                                 no_repeat_ngram_size=3, seed=7)
    options = settings.sampling()
    assert (options.do_sample, options.temperature, options.top_p, options.top_k) == (True, 0.8, 0.9, 40)
    assert (options.repetition_penalty, options.no_repeat_ngram_size, options.seed) == (1.1, 3, 7)
    assert options.ngram_window == 0
    guarded = dataclasses.replace(settings, repetition_guard=True).sampling()
    assert (guarded.no_repeat_ngram_size, guarded.ngram_window) == (30, 90)


def test_rules_cover_exactly_the_dataclass_fields() -> None:
    assert set(config.INFERENCE_RULES) == {f.name for f in dataclasses.fields(InferenceSettings)}
    assert set(config.SERVER_RULES) == {f.name for f in dataclasses.fields(ServerSettings)}
    # Every default passes its own rule.
    for section, cls in (("inference", InferenceSettings), ("server", ServerSettings)):
        for f in dataclasses.fields(cls):
            assert config.check_value(section, f.name, getattr(cls(), f.name)) == getattr(cls(), f.name)


# ------------------------------------------------------------------------------------------- presets vs typed keys
def test_typed_size_flag_beats_a_mode_preset_in_the_file(cfg: Path) -> None:
    write(cfg, '[inference]\nmode = "tiny"\n')
    assert load_settings(cfg, {}).inference.mode == "tiny"
    inference = load_settings(cfg, {"base_size": "800"}).inference
    # The typed key wins; the preset's other keys are kept, and the preset no longer applies.
    assert (inference.mode, inference.base_size, inference.image_size, inference.crop_mode) == (None, 800, 512,
                                                                                                 False)
    inference = load_settings(cfg, {"crop_mode": "true", "image_size": "640"}).inference
    assert (inference.mode, inference.base_size, inference.image_size, inference.crop_mode) == (None, 512, 640,
                                                                                                True)


def test_mode_flag_with_a_size_flag_is_one_line_error(cfg: Path) -> None:
    with pytest.raises(UserError) as caught:
        load_settings(cfg, {"mode": "small", "image_size": "640"})
    message = str(caught.value)
    assert "--mode" in message and "--image-size" in message and "\n" not in message
    assert caught.value.param == "mode"
    assert load_settings(cfg, {"mode": "small"}).inference.mode == "small"


def test_request_size_override_replaces_the_preset() -> None:
    base = InferenceSettings(mode="gundam")
    changed = base.with_overrides({"base_size": 768})
    assert (changed.mode, changed.base_size, changed.image_size, changed.crop_mode) == (None, 768, 640, True)
    with pytest.raises(UserError, match="mode"):
        base.with_overrides({"mode": "tiny", "crop_mode": False})


def test_sampling_keys_stay_unset_until_given(cfg: Path) -> None:
    inference = load_settings(cfg, {}).inference
    assert all(getattr(inference, key) is None for key in config.SAMPLING_KEYS)
    model = config.SamplingOptions(no_repeat_ngram_size=0)
    assert inference.sampling(model).no_repeat_ngram_size == 0                      # unset: the model's default
    given = load_settings(cfg, {"no_repeat_ngram_size": "20"}).inference
    assert given.sampling(model).no_repeat_ngram_size == 20                          # given: kept, even if built-in


# ------------------------------------------------------------------------------------------- settings as typed
def test_an_unwritable_config_dir_runs_on_the_defaults_with_one_warning(tmp_path: Path, monkeypatch,
                                                                        caplog) -> None:
    home = tmp_path / "readonly-home"
    home.mkdir()
    target = home / "deepseek-ocr" / "config.toml"
    monkeypatch.setattr(config, "default_config_path", lambda: target)

    def refuse(self, *args, **kwargs):  # a read-only home (chmod is no test as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        settings = load_settings(None, {"max_new_tokens": "9"})
    assert settings.inference.max_new_tokens == 9 and settings.server == ServerSettings()
    assert not target.exists()
    (record,) = caplog.records
    assert "cannot create" in record.getMessage() and "built-in defaults" in record.getMessage()
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize("flags, warned", [
    ({"temperature": "0.7"}, "--temperature is ignored"),
    ({"top_p": "0.9", "top_k": "5"}, "--top-p, --top-k are ignored"),
    ({"do_sample": "false", "top_k": "5"}, "--top-k is ignored"),
])
def test_sampling_flags_without_do_sample_warn_once(cfg: Path, caplog, flags: dict, warned: str) -> None:
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        load_settings(cfg, flags)
    (record,) = caplog.records
    assert record.getMessage().startswith(warned) and "add --do-sample true" in record.getMessage()


@pytest.mark.parametrize("flags", [{"temperature": "0.7", "do_sample": "true"}, {"temperature": "0"},
                                   {"top_p": "1.0", "top_k": "0"}, {}])
def test_no_warning_when_nothing_is_ignored(cfg: Path, caplog, flags: dict) -> None:
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        load_settings(cfg, flags)
    assert not caplog.records


def test_a_sampling_key_in_the_file_is_named_with_the_file(cfg: Path, caplog) -> None:
    write(cfg, "[inference]\ntemperature = 0.5\n")
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        load_settings(cfg)
    assert caplog.records[0].getMessage().startswith(f"temperature ({cfg}) is ignored")


def test_keyword_spelling_in_warnings_and_errors(cfg: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        load_settings(cfg, {"top_k": 3}, spell=config.keyword_spelling)
    assert caplog.records[0].getMessage().startswith("top_k is ignored") and "do_sample=True" in \
        caplog.records[0].getMessage()
    with pytest.raises(UserError, match=r"^max_new_tokens: "):
        load_settings(cfg, {"max_new_tokens": "many"}, spell=config.keyword_spelling)
    with pytest.raises(UserError, match=r"^mode is a preset of base_size"):
        load_settings(cfg, {"mode": "tiny", "base_size": 640}, spell=config.keyword_spelling)
    with pytest.raises(UnknownModelError, match=r"^model: unknown model"):
        load_settings(cfg, {"model": "x"}, spell=config.keyword_spelling)


def _snapshot(folder: Path, model_type: str, architectures: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    body = {"model_type": model_type, **({"architectures": architectures} if architectures else {})}
    (folder / "config.json").write_text(__import__("json").dumps(body), encoding="utf-8")
    return folder


def test_a_model_dir_of_another_model_is_picked_when_no_model_is_given(cfg: Path, tmp_path: Path) -> None:
    snap = _snapshot(tmp_path / "paddle", "paddleocr_vl")
    settings = load_settings(cfg, {"model_dir": str(snap)})
    assert settings.active_model == "paddleocr-vl" and settings.entry().model_dir == snap
    assert settings.models["deepseek-ocr"] == ModelEntry()
    config_flag = load_settings(cfg, {"model_config": str(snap / "config.json")})
    assert config_flag.active_model == "paddleocr-vl"


def test_a_model_dir_that_contradicts_the_model_flag_names_both(cfg: Path, tmp_path: Path) -> None:
    snap = _snapshot(tmp_path / "paddle", "paddleocr_vl", ["PaddleOCRVLForConditionalGeneration"])
    with pytest.raises(UserError, match=r"^--model-dir: .*paddle holds a PaddleOCR-VL checkpoint \(model_type "
                                        r"'paddleocr_vl', architectures \['PaddleOCRVLForConditionalGeneration'\]\),"
                                        r" not DeepSeek-OCR; use --model paddleocr-vl$"):
        load_settings(cfg, {"model": "deepseek-ocr", "model_dir": str(snap)})
    with pytest.raises(UserError, match=r"^model_dir: .*; use model='paddleocr-vl'$"):
        load_settings(cfg, {"model": "deepseek-ocr", "model_dir": str(snap)}, spell=config.keyword_spelling)
    unknown = _snapshot(tmp_path / "llama", "llama")
    with pytest.raises(UserError, match=r"not a checkpoint of a known model \(model_type 'llama'"):
        load_settings(cfg, {"model_dir": str(unknown)})
    # The matching model, and a folder whose config.json cannot tell, load as given.
    assert load_settings(cfg, {"model": "paddleocr-vl", "model_dir": str(snap)}).active_model == "paddleocr-vl"
    # PaddleOCR-VL 1.5's config.json is v1's (same model_type and architecture): the named version is taken.
    named = load_settings(cfg, {"model": "paddleocr-vl-1.5", "model_dir": str(snap)})
    assert named.active_model == "paddleocr-vl-1.5" and named.entry().model_dir == snap
    assert load_settings(cfg, {"model_dir": str(snap)}).active_model == "paddleocr-vl"
    deepseek = _snapshot(tmp_path / "ds", "deepseek_vl_v2")
    with pytest.raises(UserError, match=r"not PaddleOCR-VL 1\.5; use --model deepseek-ocr$"):
        load_settings(cfg, {"model": "paddleocr-vl-1.5", "model_dir": str(deepseek)})
    assert load_settings(cfg, {"model_dir": str(tmp_path / "absent")}).active_model == "deepseek-ocr"
