"""The one object both front ends drive: request in, text deltas and a final result out.

CONTRACT (types below are fixed; the `Pipeline` implementation fills in the rest):
- Front ends build a `Request` (prompt text with optional `<image>` placeholders, PIL images in order, the model
  id, per-call overrides) and iterate `Pipeline.stream(request, cancel)`: zero or more `TextDelta`, then exactly
  one `Result`. `Pipeline.run(request)` collects the same into a `Result`.
- Errors a user can fix raise `common.errors.UserError` subclasses; anything else is internal.

Token accounting (as OpenAI and vLLM count usage): `completion_tokens` counts every id the model generated,
the stop id included, so it never exceeds `max_new_tokens` (which counts the stop id too, as the official
`generate` does). `token_ids` and `text` exclude a stop id that ended the answer; `logprobs`, when asked for,
has one entry per generated id, the stop id's last. With `ignore_eos` nothing is a stop id: every id is kept.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import platform
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from .backend import LoadedModel, LoadModel
from .errors import UserError
from .generation import GeneratedToken, GenerationOptions
from .images import to_rgb
from .models import ModelFamily, check_family_options, get_family, read_json as _read_json
from .registry import get_model
from .sampling import SamplingOptions
from .timing import Timings
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: Per-request keys that are not config.toml settings (the rest go through `InferenceSettings.with_overrides`).
REQUEST_ONLY_KEYS = ("ignore_eos", "logprobs")
#: Settings fixed when a model is loaded; a request cannot change them.
LOAD_KEYS = ("backend", "device", "dtype", "quantize", "quantize_group_size")
#: Ids the vLLM recipe's repetition guard never bans: table cells legitimately repeat.
GUARD_EXEMPT_TOKENS = ("<td>", "</td>")
#: pip extras that provide each backend's framework.
BACKEND_PACKAGES = {"torch": ("torch", "torch"), "mlx": ("mlx", "mlx")}


@dataclass
class Request:
    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    model: str | None = None                          # None: the configured active model
    overrides: dict[str, Any] = field(default_factory=dict)  # inference keys for this call only (max_new_tokens, temperature, ...)


@dataclass(frozen=True)
class TextDelta:
    text: str                                          # new text; may be "" when a token ends mid-character
    tokens: tuple[GeneratedToken, ...] = ()


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]                               # generated ids, eos excluded
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                                 # "stop" | "length" | "cancelled"
    model: str
    backend: str
    device: str
    dtype: str
    timings_ms: dict[str, float]
    logprobs: list[GeneratedToken] | None = None       # one per generated token when asked for
    timing_calls: dict[str, int] = field(default_factory=dict)  # how often each stage ran (for averages)


@dataclass
class _Resident:
    """A loaded model with everything the pipeline needs beside it."""

    model_id: str
    model: LoadedModel
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    guard_exempt_ids: tuple[int, ...]
    generation_config: dict[str, Any]
    family: ModelFamily
    extras: dict[str, Any] = field(default_factory=dict)   # the family's side files (`ModelFamily.load_extras`)
    max_positions: int | None = None                   # the decoder's max_position_embeddings


class _TimedEncoder:
    """Tokenizer proxy that books `encode` calls as prompt.build_tokens (the model modules tokenize inside their
    `build_inputs`, together with the image preprocessing that is booked as vision.prepare_inputs)."""

    def __init__(self, tokenizer: Tokenizer, timings: Timings) -> None:
        self._tokenizer, self._timings, self.elapsed_ms = tokenizer, timings, 0.0

    def encode(self, text: str) -> list[int]:
        start = time.perf_counter()
        try:
            return self._tokenizer.encode(text)
        finally:
            self.elapsed_ms += (time.perf_counter() - start) * 1000.0


@dataclass
class Prepared:
    """A request made ready for a backend: its resident model, generation options, inputs and timings."""

    resident: _Resident
    options: GenerationOptions
    inputs: Any
    timings: Timings


class Decoding:
    """One request's generated tokens -> its events: `TextDelta`s as text completes, then the `Result`.

    Shared by `Pipeline.stream` (one sequence) and `common.batching` (many), so both count, stop and report the
    same way (see the module docstring for the token accounting).
    """

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        options = prepared.options
        self._stops = frozenset(() if options.ignore_eos else options.stop_token_ids)
        self._decoder = prepared.resident.tokenizer.incremental_decoder()
        self.generated: list[GeneratedToken] = []
        self.kept: list[int] = []
        self.finish_reason = "length"
        self.done = False

    def feed(self, token: GeneratedToken) -> list[TextDelta]:
        """Book one generated token; `done` turns true on a stop id or at the token cap."""
        options = self.prepared.options
        self.generated.append(token)
        if token.token_id in self._stops:
            self.finish_reason, self.done = "stop", True
            return []
        self.kept.append(token.token_id)
        self.done = len(self.generated) >= options.max_new_tokens
        piece = self._decoder.feed(token.token_id)
        return [TextDelta(piece, (token,))] if piece or options.logprobs else []

    def finish(self, cancelled: bool = False) -> list[TextDelta | Result]:
        """The tail of the text (if any) and the `Result`; `cancelled` unless the answer had already stopped."""
        if cancelled and self.finish_reason != "stop":
            self.finish_reason = "cancelled"
        self.done = True
        p, resident = self.prepared, self.prepared.resident
        tail = self._decoder.flush()
        events: list[TextDelta | Result] = [TextDelta(tail)] if tail else []
        model = resident.model
        events.append(Result(
            text=resident.tokenizer.decode(self.kept), token_ids=self.kept,
            prompt_tokens=int(len(p.inputs.input_ids)), completion_tokens=len(self.generated),
            finish_reason=self.finish_reason, model=resident.model_id, backend=model.backend, device=model.device,
            dtype=model.dtype, timings_ms=p.timings.as_dict(),
            logprobs=self.generated if p.options.logprobs else None, timing_calls=dict(p.timings.counts)))
        return events


def _eos_ids(generation_config: dict[str, Any], tokenizer: Tokenizer) -> tuple[int, ...]:
    """Stop ids: generation_config.json's eos_token_id (an int or a list) and the tokenizer's EOS."""
    eos = generation_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return tuple(sorted(int(i) for i in ids))


def _on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _mlx_has_metal() -> bool:
    if importlib.util.find_spec("mlx") is None:
        return False
    try:  # the backend asks MLX itself: common/ never imports a framework
        return bool(importlib.import_module("mlx_ocr.backend").metal_available())
    except Exception:  # noqa: BLE001 - a broken MLX install just means "not MLX"
        return False


def choose_backend(name: str) -> str:
    """'auto' -> MLX on Apple Silicon with Metal, PyTorch elsewhere; 'torch'/'mlx' as given."""
    if name == "auto":
        return "mlx" if _on_apple_silicon() and _mlx_has_metal() else "torch"
    if name not in BACKEND_PACKAGES:
        raise UserError(f"unknown backend {name!r}; choose auto, torch or mlx", param="backend")
    return name


def backend_loader(name: str) -> LoadModel:
    """The `load_model` of backend `name`; a backend whose framework is not installed is a `UserError`."""
    package, extra = BACKEND_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"the {name} backend needs the '{package}' package, which is not installed; "
                        f"install it with: pip install 'deepseek-ocr[{extra}]'", param="backend")
    return importlib.import_module(f"{name}_ocr.backend").load_model


class Pipeline:
    """Loads models on first use (at most `max_resident` at once, least recently used dropped first) and turns
    requests into streams of text. Thread-safe; the server still calls it from one worker thread, as MLX wants.

    `load_model` replaces the backend (tests, embedding); by default the backend is chosen once, from
    `settings.inference.backend`, when the first model loads.
    """

    def __init__(self, settings: Any, *, max_resident: int | None = None,
                 load_model: LoadModel | None = None) -> None:
        self.settings = settings
        self.max_resident = max_resident if max_resident is not None else settings.server.max_resident_models
        if self.max_resident < 1:
            raise UserError(f"max_resident must be >= 1, got {self.max_resident}")
        self._load_model = load_model
        self._models: OrderedDict[str, _Resident] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- models
    def loaded_models(self) -> list[str]:
        """Ids of the resident models, least recently used first."""
        with self._lock:
            return list(self._models)

    def load(self, model_id: str | None = None) -> LoadedModel:
        """The model `model_id` (default: the active one), loading it if needed; returns the backend's model."""
        return self._resident(model_id or self.settings.active_model).model

    def tokenizer(self, model_id: str | None = None) -> Tokenizer:
        """The tokenizer of `model_id` (default: the active model), loading the model if needed (the server
        decodes logprob ids with it)."""
        return self._resident(model_id or self.settings.active_model).tokenizer

    def loaded_tokenizer(self, model_id: str) -> Tokenizer | None:
        """The tokenizer of `model_id` if it is resident, else None. Never loads and never waits for a load in
        progress (a plain dict read), so the server's event loop may call it."""
        resident = self._models.get(model_id)
        return resident.tokenizer if resident is not None else None

    def _resident(self, model_id: str) -> _Resident:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            get_model(model_id)  # unknown ids fail before anything is dropped
            while len(self._models) >= self.max_resident:
                dropped, _ = self._models.popitem(last=False)
                log.info("unloading %s (at most %d resident)", dropped, self.max_resident)
            resident = self._load_resident(model_id)
            self._models[model_id] = resident
            return resident

    def _load_resident(self, model_id: str) -> _Resident:
        from .assets import resolve_model_files  # noqa: PLC0415 - downloads happen only when a model is loaded

        files = resolve_model_files(model_id, self.settings.entry(model_id))
        tokenizer = Tokenizer.from_files(files.tokenizer, files.tokenizer_config)
        inference = self.settings.inference
        if self._load_model is None:
            self._load_model = backend_loader(choose_backend(inference.backend))
        started = time.perf_counter()
        model = self._load_model(model_id, Path(files.config), Path(files.weights),
                                 dtype=inference.dtype, device=inference.device, **_quantize_options(inference))
        log.info("loaded %s on %s/%s/%s in %.1f s", model_id, model.backend, model.device, model.dtype,
                 time.perf_counter() - started)
        generation_config = _read_json(files.generation_config)
        family = get_family(model_id)
        resident = _Resident(
            model_id=model_id, model=model, tokenizer=tokenizer,
            stop_ids=_eos_ids(generation_config, tokenizer),
            guard_exempt_ids=tuple(i for t in GUARD_EXEMPT_TOKENS if (i := tokenizer.token_to_id(t)) is not None),
            generation_config=generation_config, family=family, extras=family.load_extras(files),
            max_positions=_max_positions(family, Path(files.config)))
        if not resident.stop_ids:
            log.warning("%s: no EOS id in the tokenizer or generation_config.json; answers end at the cap", model_id)
        return resident

    # ------------------------------------------------------------------------------------------- requests
    def _options(self, resident: _Resident, overrides: dict[str, Any]) -> tuple[Any, GenerationOptions]:
        """(inference settings for this request, generation options), overrides checked by the config rules."""
        overrides = dict(overrides)
        extra = {key: overrides.pop(key) for key in REQUEST_ONLY_KEYS if key in overrides}
        check_family_options(resident.model_id, overrides)
        for key in LOAD_KEYS:
            value = overrides.pop(key, None)
            if value is not None and value != getattr(self.settings.inference, key):
                raise UserError(f"{key} is fixed when the model loads ({getattr(self.settings.inference, key)!r}); "
                                "it cannot change per request", param=key)
        inference = self.settings.inference.with_overrides(overrides)
        logprobs = extra.get("logprobs") or 0
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
            raise UserError(f"logprobs must be an integer >= 0, got {logprobs!r}", param="logprobs")
        ignore_eos = extra.get("ignore_eos") or False
        if not isinstance(ignore_eos, bool):
            raise UserError(f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
        sampling = self._sampling(resident, inference)
        options = GenerationOptions(max_new_tokens=inference.max_new_tokens, ignore_eos=ignore_eos,
                                    use_cache=inference.use_cache, logprobs=logprobs,
                                    stop_token_ids=resident.stop_ids, sampling=sampling)
        return inference, options

    def _sampling(self, resident: _Resident, inference: Any) -> SamplingOptions:
        # The model family's defaults first; any key set in config.toml, a flag or the request replaces them.
        sampling = inference.sampling(resident.family.generation_defaults(resident.generation_config))
        if inference.repetition_guard:
            sampling = dataclasses.replace(sampling, ngram_exempt_ids=resident.guard_exempt_ids)
        return sampling

    def _build_inputs(self, resident: _Resident, request: Request, inference: Any, timings: Timings) -> Any:
        """Render the prompt and build the model's inputs, booking the three preparation stages."""
        family = resident.family
        with timings.measure("prompt.render"):
            prompt = family.render_prompt(request.prompt, inference)
        encoder = _TimedEncoder(resident.tokenizer, timings)
        start = time.perf_counter()
        # Front ends normally hand over RGB already (common.images); anything else is converted as the official
        # loaders do, so a library caller cannot feed RGBA or palette pixels to the preprocessing.
        images = [im if im.mode == "RGB" else to_rgb(im) for im in request.images]
        inputs = family.prepare(prompt, images, encoder, inference, resident.extras)
        # Tokenizing happens inside prepare; everything else there is image work.
        total_ms = (time.perf_counter() - start) * 1000.0
        timings.add("prompt.build_tokens", encoder.elapsed_ms)
        timings.add("vision.prepare_inputs", total_ms - encoder.elapsed_ms)
        return inputs

    def prepare(self, request: Request) -> Prepared:
        """`request` made ready for a backend: its model (loaded if needed), options and inputs. Raises
        `UserError` for bad options, prompts or images; nothing is generated yet."""
        resident = self._resident(request.model or self.settings.active_model)
        inference, options = self._options(resident, request.overrides)
        timings = Timings()
        inputs = self._build_inputs(resident, request, inference, timings)
        options = _fit_context(options, int(len(inputs.input_ids)), resident.max_positions)
        return Prepared(resident, options, inputs, timings)

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[TextDelta | Result]:
        """Generate for `request`: `TextDelta`s as text becomes complete (never half a UTF-8 character), then one
        `Result`. `cancel` is checked between tokens (finish_reason "cancelled"). Raises `UserError` for bad
        options, prompts or images, before anything is yielded."""
        prepared = self.prepare(request)
        decoding = Decoding(prepared)
        tokens = iter(prepared.resident.model.generate(prepared.inputs, prepared.options, prepared.timings, cancel))
        try:
            while not decoding.done:
                token = next(tokens, None)  # the backend books decode.* and vision.compute_embeddings
                if token is None:
                    break
                yield from decoding.feed(token)
                if cancel is not None and cancel.is_set():
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # frees the backend's cache now, not whenever the generator is collected
        yield from decoding.finish(cancelled=cancel is not None and cancel.is_set())

    def batch(self, model_id: str | None = None, max_batch: int = 8) -> Any:
        """A continuous-batching session over one model (`common.batching.Batch`): admit requests between
        steps, each step gives every running request its next events."""
        from .batching import Batch  # noqa: PLC0415 - batching builds on this module

        return Batch(self, model_id or self.settings.active_model, max_batch)

    def map(self, requests: Iterable[Request], batch_size: int = 1, *,
            return_errors: bool = False) -> Iterator[Result | UserError]:
        """Results of `requests` in their order, decoded `batch_size` at a time (pulled lazily, so a generator of
        PDF pages renders only what the batch needs). A request that fails its preparation raises its
        `UserError` in its place, or with `return_errors` is yielded in its place and the run goes on."""
        from .batching import run_in_order  # noqa: PLC0415

        return run_in_order(self, requests, batch_size, return_errors=return_errors)

    def run(self, request: Request, cancel: threading.Event | None = None) -> Result:
        """`stream` collected: the final `Result`."""
        result = None
        for event in self.stream(request, cancel):
            if isinstance(event, Result):
                result = event
        assert result is not None  # stream always ends with a Result
        return result


def _quantize_options(inference: Any) -> dict[str, Any]:
    """Quantization keywords for the backend, only when asked for (a loader given none loads float weights)."""
    if not inference.quantize:
        return {}
    return {"quantize": inference.quantize, "group_size": inference.quantize_group_size}


def _max_positions(family: ModelFamily, config_path: Path) -> int:
    """The decoder's context length from config.json (the KV cache is sized from it per request)."""
    return family.max_positions(config_path)


def _fit_context(options: GenerationOptions, prompt_tokens: int, max_positions: int | None) -> GenerationOptions:
    """Refuse a prompt longer than the model's context; shorten `max_new_tokens` to what still fits (the answer
    then ends with finish_reason "length", as when the cap is reached)."""
    if max_positions is None:
        return options
    if prompt_tokens >= max_positions:
        raise UserError(f"the prompt is {prompt_tokens} tokens (images included) but the model's context is "
                        f"{max_positions}; use fewer or smaller images (e.g. a smaller --mode)", param="prompt")
    room = max_positions - prompt_tokens
    return dataclasses.replace(options, max_new_tokens=min(options.max_new_tokens, room))
