"""Settings shared by the CLI and the server: config.toml, command-line flags and per-request overrides.

Precedence is command-line flag > config.toml > built-in default (for sampling keys: the model family's own
defaults, applied by the pipeline where a key stays unset), and on the server a request's fields override
the result for that request only (`InferenceSettings.with_overrides`). Every value, whatever its origin, is checked
by the same rules (`RULES` and `check_value`), so a bad value reads the same way in all three places; only the
prefix differs: the file and key for config.toml (`ConfigError`), the flag for the command line, the request field
for the server (`UserError`).

The user's config.toml is created with commented defaults when absent (`common/default_config.toml`) and is never
written again: we read it, we do not reformat it. When its folder cannot be written (a read-only home), the run goes
on with the built-in defaults and one warning line; a file named explicitly (`--config PATH`) must exist.

Messages name a setting the way the caller's user spells it (`spell`): `--model-dir` on the command line
(`flag_spelling`), `model_dir` in Python (`keyword_spelling`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import platformdirs

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser, published separately
    import tomli as tomllib

from .errors import ConfigError, UnknownModelError, UserError
from .prompts import DEEPSEEK_TEMPLATES as TEMPLATES  # the templates the prompt renderer knows
from .models import family_ids, family_of_config, get_family, model_options
from .sampling import SamplingOptions

log = logging.getLogger("deepseek_ocr.config")

APP = "deepseek-ocr"
CONFIG_NAME = "config.toml"

DEVICES = ("auto", "cpu", "cuda", "metal")
BACKENDS = ("auto", "torch", "mlx")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_IDS = family_ids()
#: Keys only one model family understands (DeepSeek-OCR's `mode`, PaddleOCR-VL's `task`), from the registry.
MODEL_OPTIONS = {option.name: option for option in model_options()}

# The vLLM recipe's repetition guard (see InferenceSettings.sampling).
GUARD_NGRAM_SIZE = 30
GUARD_WINDOW = 90


# --------------------------------------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class Rule:
    """How one key is checked: its type, an extra test, and the words that tell the user what is allowed."""

    kind: type                                   # bool, int, float or str
    allowed: str
    test: Callable[[Any], bool] = lambda value: True
    optional: bool = False                       # may be left unset (None)


def _choice(names: tuple[str, ...], optional: bool = False) -> Rule:
    return Rule(str, " | ".join(names), lambda v: v in names, optional)


def _int(low: int, high: int | None = None, optional: bool = False) -> Rule:
    words = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return Rule(int, words, lambda v: v >= low and (high is None or v <= high), optional)


_BOOL = Rule(bool, "true | false")

INFERENCE_RULES: dict[str, Rule] = {
    "device": _choice(DEVICES),
    "backend": _choice(BACKENDS),
    "dtype": _choice(DTYPES),
    "template": _choice(TEMPLATES),
    "base_size": _int(16, 8192),
    "image_size": _int(16, 8192),
    "crop_mode": _BOOL,
    **{name: _choice(option.choices, optional=True) for name, option in MODEL_OPTIONS.items()},
    "max_new_tokens": _int(1),
    "use_cache": _BOOL,
    "repetition_guard": _BOOL,
    "quantize": Rule(int, "4 | 8", lambda v: v in (4, 8), optional=True),
    "quantize_group_size": Rule(int, "32 | 64 | 128", lambda v: v in (32, 64, 128)),
    # Sampling keys may stay unset (None): the model's own generation defaults then apply.
    "do_sample": Rule(bool, "true | false", optional=True),
    "temperature": Rule(float, "a number >= 0", lambda v: v >= 0, optional=True),
    "top_p": Rule(float, "a number > 0 and <= 1", lambda v: 0 < v <= 1, optional=True),
    "top_k": _int(0, optional=True),
    "repetition_penalty": Rule(float, "a number > 0", lambda v: v > 0, optional=True),
    "no_repeat_ngram_size": _int(0, optional=True),
    "seed": _int(0, 2**63 - 1, optional=True),
}

_SECONDS = Rule(float, "a number of seconds > 0", lambda v: v > 0)

SERVER_RULES: dict[str, Rule] = {
    "host": Rule(str, "a host name or IP address", lambda v: v.strip() != ""),
    "port": _int(0, 65535),
    "api_key": Rule(str, "a non-blank string", lambda v: v.strip() != "", optional=True),
    "api_key_file": Rule(str, "a file path", lambda v: v.strip() != "", optional=True),
    "insecure_no_auth": _BOOL,
    "allow_private_urls": _BOOL,
    "max_request_bytes": _int(1),
    "max_image_pixels": _int(1),
    "max_images_per_request": _int(1),
    "max_request_pixels": _int(1),
    "max_inflight_pixels": _int(1),
    "max_inflight_requests": _int(0),
    "decode_workers": _int(1, 64),
    "queue_size": _int(1),
    "max_batch_size": _int(0, 256),
    "max_resident_models": _int(1),
    "image_fetch_timeout_s": _SECONDS,
    "image_max_bytes": _int(1),
    "max_image_urls": _int(0),
    "image_fetch_request_bytes": _int(1),
    "image_fetch_request_timeout_s": _SECONDS,
    "request_timeout_s": _SECONDS,
    "keep_alive_timeout_s": _SECONDS,
    "max_connections": _int(0),
}

ENTRY_KEYS = ("config", "tokenizer", "weights", "model_dir")
RULES: dict[str, dict[str, Rule]] = {"inference": INFERENCE_RULES, "server": SERVER_RULES}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class InvalidValue(ValueError):
    """A value broke its rule; the message says what is allowed (callers add where the value came from)."""


def check_value(section: str, key: str, value: Any, *, lenient: bool = False) -> Any:
    """Return `value` checked (and converted) for `[section] key`, or raise `InvalidValue`.

    `lenient` accepts the strings a command line or query gives ("true", "8", "0.5"); config.toml values must
    already have the right TOML type. An integer is always accepted where a number is expected.
    """
    rule = RULES[section][key]
    if value is None:
        if rule.optional:
            return None
        raise InvalidValue(f"must be set (allowed: {rule.allowed})")
    converted = _convert(rule.kind, value, lenient)
    if converted is None or not rule.test(converted):
        raise InvalidValue(f"{value!r} is not allowed (allowed: {rule.allowed})")
    return converted


def _convert(kind: type, value: Any, lenient: bool) -> Any:
    """`value` as `kind`, or None when it cannot be (bool is never taken for a number, nor a number for a bool)."""
    if isinstance(value, str) and kind is not str:
        if not lenient:
            return None
        text = value.strip().lower()
        if kind is bool:
            return True if text in _TRUE else False if text in _FALSE else None
        try:
            return kind(text)
        except ValueError:
            return None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        if isinstance(value, float) and lenient and value.is_integer():
            return int(value)
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, kind) else None


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class InferenceSettings:
    """The [inference] keys: how to run a model and how to sample. Defaults match the official inference code.

    A sampling key left None was given nowhere: `sampling(defaults)` fills it from the model's own defaults, so a
    value the user gave is kept even when it equals a built-in one. A `mode` preset and the keys it sets stay
    consistent: a later layer that sets one of those keys clears the preset (see `_layer`).
    """

    device: str = "auto"
    backend: str = "auto"
    dtype: str = "auto"
    template: str = "plain"
    base_size: int = 1024
    image_size: int = 640
    crop_mode: bool = True
    mode: str | None = None            # a DeepSeek-OCR preset standing for base_size/image_size/crop_mode
    task: str | None = None            # a PaddleOCR-VL prompt shortcut
    max_new_tokens: int = 512
    use_cache: bool = True
    repetition_guard: bool = False
    quantize: int | None = None        # quantize the decoder to 4 or 8 bits at load time
    quantize_group_size: int = 64
    do_sample: bool | None = None      # sampling keys: None = the model's default (SamplingOptions' for DeepSeek-OCR)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    seed: int | None = None

    def with_overrides(self, overrides: Mapping[str, Any]) -> InferenceSettings:
        """These settings with per-request values on top; None means "not given".

        Raises `UserError` (param = the key) for an unknown key, a value its rule refuses, or a preset given with
        a key it sets (`mode` with `base_size`).
        """
        changes = {}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in INFERENCE_RULES:
                raise UserError(f"unknown option {key!r} (known: {', '.join(INFERENCE_RULES)})", param=key)
            try:
                changes[key] = check_value("inference", key, value, lenient=True)
            except InvalidValue as error:
                raise UserError(f"{key}: {error}", param=key) from None
        return dataclasses.replace(self, **_layer(dataclasses.asdict(self), changes, lambda key: key))

    def sampling(self, defaults: SamplingOptions = SamplingOptions()) -> SamplingOptions:
        """The sampling rules these settings ask for, `defaults` (the model's) where a key is unset.

        With `repetition_guard` the n-gram ban becomes the vLLM recipe's (size 30 over the last 90 tokens); the
        ids it exempts (table cells) depend on the tokenizer, so the pipeline adds them with `dataclasses.replace`.
        """
        given = {key: getattr(self, key) for key in SAMPLING_KEYS if getattr(self, key) is not None}
        options = dataclasses.replace(defaults, **given, seed=self.seed)
        if self.repetition_guard:
            options = dataclasses.replace(options, no_repeat_ngram_size=GUARD_NGRAM_SIZE, ngram_window=GUARD_WINDOW)
        return options


#: The [inference] keys that are sampling rules (`SamplingOptions` fields of the same names).
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")
#: Keys that only shape a random draw, with the value at which each changes nothing (temperature 0 is greedy).
#: Both models decode greedily unless do_sample is true, so without it these are ignored, never silently.
DRAW_KEYS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def ignored_sampling_keys(inference: InferenceSettings, keys: Iterable[str] = DRAW_KEYS) -> list[str]:
    """The keys of `keys` set to a value that would change a draw while `do_sample` is not true: the rule is
    that such values are ignored with one warning line (`warn_ignored_sampling`), on every front end alike."""
    if inference.do_sample:
        return []
    return [key for key in DRAW_KEYS if key in keys and getattr(inference, key) not in (None, DRAW_KEYS[key])]


def warn_ignored_sampling(inference: InferenceSettings, keys: Iterable[str] = DRAW_KEYS, *,
                          names: Callable[[str], str] | None = None, hint: str | None = None) -> list[str]:
    """Log one warning line when `ignored_sampling_keys` finds any; `names` spells a key for the user, `hint` says
    how to turn sampling on (default: `do_sample`). Returns the keys warned about."""
    ignored = ignored_sampling_keys(inference, keys)
    if ignored:
        spelled = ", ".join((names or keyword_spelling)(key) for key in ignored)
        log.warning("%s %s ignored: sampling is off (greedy decoding); %s", spelled,
                    "is" if len(ignored) == 1 else "are", hint or f"set {keyword_spelling('do_sample', True)} to sample")
    return ignored


def flag_spelling(key: str, value: Any = None) -> str:
    """A setting as the command line spells it: `--model-dir`, `--model paddleocr-vl`, `--do-sample true`."""
    name = _flag(key)
    if value is None:
        return name
    return f"{name} {str(value).lower() if isinstance(value, bool) else value}"


def keyword_spelling(key: str, value: Any = None) -> str:
    """A setting as the Python API spells it: `model_dir`, `model='paddleocr-vl'`, `do_sample=True`."""
    return key if value is None else f"{key}={value!r}"


def _layer(lower: Mapping[str, Any], upper: Mapping[str, Any], spell: Callable[[str], str]) -> dict[str, Any]:
    """`upper`'s [inference] values over `lower`'s, keeping presets (`mode`) consistent with the keys they set.

    A preset and a key it sets in the same layer is a `UserError` (`spell` names them as the user typed them).
    A layer that sets such a key without the preset turns the lower layer's preset into its values first, so the
    typed key wins and the preset's other keys are kept: `mode = "tiny"` below `--base-size 800` gives
    base_size 800 with tiny's image_size and crop_mode.
    """
    merged = {**lower, **upper}
    for name, option in MODEL_OPTIONS.items():
        typed = [key for key in option.replaces if key in upper]
        if not typed:
            continue
        if upper.get(name) is not None:
            raise UserError(f"{spell(name)} is a preset of {', '.join(map(spell, option.replaces))}; give "
                            f"{spell(name)} or {spell(typed[0])}, not both", param=name)
        preset = option.presets.get(lower.get(name) or "", {})
        merged.update({**preset, **{key: upper[key] for key in typed}, name: None})
    return merged


@dataclass(frozen=True)
class ServerSettings:
    """The [server] keys: where to listen and the limits that protect the server.

    Safe by default: loopback only, and a non-loopback host needs an API key (or `insecure_no_auth`). Every
    resource a request can make the server spend (body, images, pixels, URL fetches, connections, time) has a cap.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str | None = None      # a file holding the key, so it is not on the command line
    insecure_no_auth: bool = False       # allow a non-loopback host without an API key
    allow_private_urls: bool = False
    max_request_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 64_000_000   # one image
    max_images_per_request: int = 16
    max_request_pixels: int = 64_000_000     # all images of one request
    max_inflight_pixels: int = 192_000_000   # all admitted requests together (RGB: 3 bytes a pixel)
    max_inflight_requests: int = 0       # admitted at once; 0 = queue_size + the batch (queued and decoding)
    decode_workers: int = 2              # threads decoding images and parsing bodies
    queue_size: int = 16
    max_batch_size: int = 0              # requests decoded together (continuous batching); 0 = 4 on CPU, else 8
    max_resident_models: int = 1
    image_fetch_timeout_s: float = 10.0
    image_max_bytes: int = 20 * 1024 * 1024
    max_image_urls: int = 8              # http(s) image URLs in one request
    image_fetch_request_bytes: int = 40 * 1024 * 1024   # all fetches of one request
    image_fetch_request_timeout_s: float = 30.0          # all fetches of one request
    request_timeout_s: float = 60.0      # header + body, from the first byte (does not restart per byte)
    keep_alive_timeout_s: float = 15.0   # an idle kept-alive connection is closed after this
    max_connections: int = 100           # open connections; more are answered 503 and closed (0 = no cap)


@dataclass(frozen=True)
class ModelEntry:
    """Where one model's files are, when the user says so; all None means "download into the cache"."""

    config: Path | None = None
    tokenizer: Path | None = None
    weights: Path | None = None
    model_dir: Path | None = None
    #: How messages about these files name the settings (`flag_spelling` or `keyword_spelling`).
    spell: Callable[..., str] = field(default=flag_spelling, compare=False, repr=False)

    @property
    def is_local(self) -> bool:
        return any(getattr(self, key) is not None for key in ENTRY_KEYS)


@dataclass(frozen=True)
class Settings:
    active_model: str
    models: dict[str, ModelEntry]      # one entry per registry id, always
    inference: InferenceSettings
    server: ServerSettings
    config_path: Path

    def entry(self, model_id: str | None = None) -> ModelEntry:
        """The file locations of `model_id` (default: the active model); unknown ids raise UnknownModelError."""
        model_id = model_id or self.active_model
        if model_id not in self.models:
            raise UnknownModelError(f"unknown model {model_id!r} (known: {', '.join(self.models)})")
        return self.models[model_id]


# --------------------------------------------------------------------------------------------------- loading
FLAG_NAMES = (*INFERENCE_RULES, *SERVER_RULES, "model", *ENTRY_KEYS, "model_config")


def default_config_path() -> Path:
    """config.toml in the platform's per-user config folder (e.g. ~/.config/deepseek-ocr/config.toml)."""
    return Path(platformdirs.user_config_dir(APP, appauthor=False, roaming=True)) / CONFIG_NAME


def default_config_text() -> str:
    """The commented defaults written on first run."""
    return resources.files(__package__).joinpath("default_config.toml").read_text(encoding="utf-8")


def load_settings(config_path: Path | None = None, flags: Mapping[str, Any] = {}, *,
                  spell: Callable[..., str] | None = None) -> Settings:
    """Settings from built-in defaults, then config.toml, then `flags` (a value of None is "not given").

    `config_path` None uses `default_config_path()`; when that file is missing it is created with the commented
    defaults, and when it cannot be created (read-only home) the built-in defaults apply, with one warning line.
    A `config_path` given explicitly must exist. Flag names are the config keys (`max_new_tokens`, `port`, ...),
    plus `model` (the active model) and `model_dir` / `config` (alias `model_config`) / `tokenizer` / `weights`
    for the active model's entry. A `model_dir` flag replaces every path the file gives that model; the other path
    flags replace one path each. Path flags holding another model's checkpoint (config.json `model_type`) pick
    that model when no `model` flag is given, and are a `UserError` naming it otherwise. `spell(key, value=None)`
    names a flag in messages (default `flag_spelling`; the Python API passes `keyword_spelling`). Sampling values
    that sampling-off would ignore are logged once (`warn_ignored_sampling`).
    Raises `ConfigError` for a bad or missing file, `UserError` for a bad flag value, `UnknownModelError` for an
    unknown model id, and `TypeError` for a flag name that is not one of `FLAG_NAMES` (a front-end bug).
    """
    spell = spell or flag_spelling
    if config_path is not None:
        path = Path(config_path).expanduser()
        if not path.exists():
            raise ConfigError(f"{spell('config')}: {path} does not exist (create it, or leave {spell('config')} out "
                              "to use the per-user config.toml)")
        raw = _read_toml(path)
    else:
        path = default_config_path()
        raw = _read_toml(path) if _write_defaults_if_missing(path) else {}
    for key in raw:
        if key not in ("models", *RULES):
            raise _unknown(path, "", key, ("models", *RULES))
    given = {key: value for key, value in flags.items() if value is not None}
    unknown = sorted(set(given) - set(FLAG_NAMES))
    if unknown:
        raise TypeError(f"load_settings: unknown flag names {unknown} (known: {', '.join(FLAG_NAMES)})")

    file_models = _parse_models(path, raw.get("models", {}))
    active = file_models.pop("", None) or MODEL_IDS[0]
    if "model" in given:
        active = str(given["model"])
        if active not in MODEL_IDS:
            raise UnknownModelError(f"{spell('model')}: unknown model {active!r} (known: {', '.join(MODEL_IDS)})")
    models = {model_id: file_models.get(model_id, ModelEntry()) for model_id in MODEL_IDS}
    flagged = _apply_path_flags(ModelEntry(), given, spell)
    if flagged.is_local:
        active = _checkpoint_model(flagged, active, "model" in given, spell)
        models[active] = _apply_path_flags(models[active], given, spell)

    models = {model_id: dataclasses.replace(entry, spell=spell) for model_id, entry in models.items()}

    sections = {}
    typed_keys: dict[str, dict[str, Any]] = {}
    for section, rules in RULES.items():
        values = _parse_section(path, section, raw.get(section, {}))
        typed = typed_keys[section] = {key: _check_flag(section, key, given[key], spell)
                                       for key in rules if key in given}
        # A typed flag beats config.toml, presets included (see `_layer`); [server] has no presets.
        sections[section] = _layer(values, typed, spell) if section == "inference" else {**values, **typed}
    inference = InferenceSettings(**sections["inference"])
    warn_ignored_sampling(inference, names=lambda key: spell(key) if key in typed_keys["inference"]
                          else f"{key} ({path})", hint=f"add {spell('do_sample', True)} to sample")
    return Settings(
        active_model=active,
        models=models,
        inference=inference,
        server=ServerSettings(**sections["server"]),
        config_path=path,
    )


def _checkpoint_model(entry: ModelEntry, active: str, model_given: bool, spell: Callable[..., str]) -> str:
    """The model whose checkpoint the path flags point at: `active` when its family claims config.json, else the
    family config.json's `model_type` names when no model was given (the first in registry order: a PaddleOCR-VL
    1.5 snapshot, whose config.json is v1's, needs the model named); a typed model that does not match is a
    `UserError` saying which flag to add."""
    where, config = ((spell("model_config"), entry.config) if entry.config is not None
                     else (spell("model_dir"), (entry.model_dir or Path()) / "config.json"))
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return active  # missing or unreadable: the file checks at load time say so, naming the file
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        return active
    own = get_family(active)
    if own.matches_model_type(model_type) and own.matches_config(raw):
        return active  # also a family that shares another's config.json (PaddleOCR-VL 1.5 has v1's)
    holder = family_of_config(raw)
    if holder is not None and not model_given:
        log.info("%s holds a %s checkpoint: using model %s", config.parent, holder.display_name, holder.id)
        return holder.id
    architectures = raw.get("architectures")
    what = f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")
    expected = get_family(active).display_name
    if holder is None:
        raise UserError(f"{where}: {config} is not a checkpoint of a known model ({what}; known: "
                        f"{', '.join(MODEL_IDS)}); {expected} needs its own snapshot", param="model_dir")
    raise UserError(f"{where}: {config.parent} holds a {holder.display_name} checkpoint ({what}), not "
                    f"{expected}; use {spell('model', holder.id)}", param="model")


def _write_defaults_if_missing(path: Path) -> bool:
    """Create `path` with the commented defaults; never replaces a file, even one created a moment ago.

    True when the file exists afterwards; False, after one warning line, when its folder cannot be written (a
    read-only home must not stop a run: the built-in defaults apply then).
    """
    if path.exists():
        return True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside then linked into place: a reader never sees half a file, and link() refuses to overwrite.
        # mkstemp makes it owner-only (0600), which suits a file that may hold the server's api_key.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".toml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(default_config_text())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: exclusive create is the next best
                with path.open("x", encoding="utf-8", newline="\n") as handle:
                    handle.write(default_config_text())
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as error:
        if path.exists():
            return True
        log.warning("cannot create %s (%s); using the built-in defaults, no config file written",
                    path, error.strerror or error)
        return False
    return True


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None


def _unknown(path: Path, where: str, key: str, allowed: Any) -> ConfigError:
    return ConfigError(f"{path}: unknown key {where}{key} (allowed: {', '.join(allowed)})")


def _table(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a table, like [{where.strip('[] ')}]")
    return value


def _parse_section(path: Path, section: str, raw: Any) -> dict[str, Any]:
    """The keys of [inference] or [server] present in the file, each checked by its rule."""
    rules = RULES[section]
    values = {}
    for key, value in _table(path, f"[{section}]", raw).items():
        if key not in rules:
            raise _unknown(path, f"[{section}] ", key, rules)
        try:
            values[key] = check_value(section, key, value)
        except InvalidValue as error:
            raise ConfigError(f"{path}: [{section}] {key}: {error}") from None
    return values


def _parse_models(path: Path, raw: Any) -> dict[str, Any]:
    """{model_id: ModelEntry} from [models.entries.*], plus key "" holding [models] active when set."""
    models = _table(path, "[models]", raw)
    result: dict[str, Any] = {}
    for key, value in models.items():
        if key == "active":
            if value not in MODEL_IDS:
                raise ConfigError(
                    f"{path}: [models] active: {value!r} is not a known model (allowed: {' | '.join(MODEL_IDS)})"
                )
            result[""] = value
        elif key == "entries":
            for model_id, entry in _table(path, "[models.entries]", value).items():
                if model_id not in MODEL_IDS:
                    dotted = [known for known in MODEL_IDS if known.startswith(model_id + ".")]
                    hint = (f"; an id with a dot needs quotes in TOML: [models.entries.\"{dotted[0]}\"]"
                            if dotted else "")
                    raise ConfigError(f"{path}: [models.entries.{model_id}]: unknown model "
                                      f"(allowed: {' | '.join(MODEL_IDS)}){hint}")
                result[model_id] = _parse_entry(path, model_id, entry)
        else:
            raise _unknown(path, "[models] ", key, ("active", "entries"))
    return result


def _parse_entry(path: Path, model_id: str, raw: Any) -> ModelEntry:
    where = f"[models.entries.{model_id}]"
    paths = {}
    for key, value in _table(path, where, raw).items():
        if key not in ENTRY_KEYS:
            raise _unknown(path, f"{where} ", key, ENTRY_KEYS)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{path}: {where} {key}: {value!r} is not allowed (allowed: a file or folder path)")
        # Relative paths belong to the config file, not to wherever the program happens to be started.
        paths[key] = path.parent / Path(value).expanduser()
    return ModelEntry(**paths)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_flag(section: str, key: str, value: Any, spell: Callable[..., str] = flag_spelling) -> Any:
    try:
        return check_value(section, key, value, lenient=True)
    except InvalidValue as error:
        raise UserError(f"{spell(key)}: {error}", param=key) from None


def _apply_path_flags(entry: ModelEntry, given: Mapping[str, Any],
                      spell: Callable[..., str] = flag_spelling) -> ModelEntry:
    """The active model's entry with the path flags on top (see `load_settings` for the rule)."""
    flags = dict(given)
    if "model_config" in flags:
        flags.setdefault("config", flags.pop("model_config"))
    paths = {}
    for key in ENTRY_KEYS:
        if key in flags:
            text = str(flags[key])
            if not text.strip():
                raise UserError(f"{spell('model_config' if key == 'config' else key)}: a path is required", param=key)
            paths[key] = Path(text).expanduser().absolute()
    if "model_dir" in paths:
        return ModelEntry(**paths)
    return dataclasses.replace(entry, **paths)
