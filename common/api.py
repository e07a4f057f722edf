"""The Python API for scripts and notebooks: load a model once, OCR many images, get text and timings back.

`OCR` wraps the same `common.pipeline.Pipeline` the CLI and the server drive, with settings resolved the same way
(`common.config.load_settings`: arguments > config.toml > built-in defaults) and the CLI's default prompts
(DeepSeek-OCR: "<image>\\n<|grounding|>Convert the document to markdown.", PaddleOCR-VL: "OCR:").

Usage:
    from common.api import OCR

    ocr = OCR("deepseek-ocr", mode="small")                 # downloads on first use; or model_dir="snapshot/"
    result = ocr("page.png")                                 # a path, URL, bytes, stream or PIL image
    print(result.text, result.timings_ms["decode.generate"])
    ocr(["a.png", "b.png"], prompt="<image> <image>\\nCompare the two pages.")
    for piece in ocr.stream("page.png", prompt="<image>\\nFree OCR."):
        print(piece, end="", flush=True)
    for result in ocr.map(["a.png", "b.png", "c.png"], batch_size=4):   # each its own answer, in order
        print(result.text)
    pages = ocr.pdf("doc.pdf", pages="1-3")                  # one Result per page, needs the `pdf` extra

Errors you can fix (unknown option, bad value, unreadable image, prompt/image mismatch) raise
`common.errors.UserError` subclasses with a one-line message.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence, Union

from PIL import Image

from .config import (INFERENCE_RULES, InvalidValue, Settings, check_value, keyword_spelling, load_settings,
                     warn_ignored_sampling)
from .errors import UserError
from .images import open_image
from .pdf import DEFAULT_DPI, PageReader, PdfSource, is_pdf, is_pdf_file, iter_pages
from .pipeline import REQUEST_ONLY_KEYS, Pipeline, Request, Result, TextDelta
from .models import check_family_options, get_family, model_options

#: One image: a file path, an http(s) URL, encoded bytes, a binary stream, or a PIL image.
ImageInput = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]

#: Keyword arguments of `OCR(...)` that name model files (the rest are [inference] settings).
FILE_KEYS = ("model_config", "tokenizer", "weights")
_URL_PREFIXES = ("http://", "https://")
#: [inference] keys that belong to one model family (`mode`, `task`).
_FAMILY_OPTIONS = tuple(option.name for option in model_options())


class OCR:
    """A loaded model behind the shared pipeline. Calls are thread-safe (the pipeline serialises what must be).

    `model`: a registry id, `common.models.family_ids()` (None: config.toml's active model, else the first).
    `model_dir`, `model_config`, `tokenizer`, `weights`: local files (default: the hub snapshot in the cache).
    `backend`, `device`, `dtype`: fixed at load ("auto" unless config.toml says otherwise).
    `config`: the config.toml to read (default: the per-user one, created with comments when absent).
    `**defaults`: any [inference] setting (`max_new_tokens=`, `mode=`, `task=`, `temperature=`, ...) for every
    call; each call may override them with its own keyword arguments, plus `ignore_eos` and `logprobs`.
    `load=False` defers loading (and any download) to the first call.
    """

    def __init__(self, model: str | None = None, *, model_dir: str | os.PathLike | None = None,
                 backend: str | None = None, device: str | None = None, dtype: str | None = None,
                 config: str | os.PathLike | None = None, load: bool = True, **defaults: Any) -> None:
        flags: dict[str, Any] = {"model": model, "model_dir": model_dir, "backend": backend, "device": device,
                                 "dtype": dtype}
        for key, value in defaults.items():
            if key in FILE_KEYS:
                flags[key] = value
            elif key in INFERENCE_RULES:
                flags[key] = _checked(key, value)
            else:
                known = ", ".join(k for k in (*INFERENCE_RULES, *FILE_KEYS) if k not in flags)
                raise UserError(f"OCR() got an unknown option {key!r} (known: {known})", param=key)
        for key in ("model_dir", *FILE_KEYS):
            if flags.get(key) is not None:
                flags[key] = os.fspath(flags[key])
        # Messages name keyword arguments (model_dir=...), not command-line flags.
        self.settings: Settings = load_settings(Path(config) if config is not None else None, flags,
                                                spell=keyword_spelling)
        self.model: str = self.settings.active_model
        self.family = get_family(self.model)
        _check_model_options(self.model, defaults)
        # The family options given here (e.g. task) shape every call's default prompt unless a call overrides them.
        self._family_options = {name: defaults.get(name) for name in _FAMILY_OPTIONS}
        self.pipeline = Pipeline(self.settings, max_resident=1)
        self.last_result: Result | None = None
        self._lock = threading.Lock()
        if load:
            self.pipeline.load(self.model)

    def __repr__(self) -> str:
        return f"OCR({self.model!r}, loaded={bool(self.pipeline.loaded_models())})"

    # ------------------------------------------------------------------------------------------ calls
    def __call__(self, images: ImageInput | Sequence[ImageInput] | None = None, prompt: str | None = None,
                 cancel: threading.Event | None = None, **overrides: Any) -> Result:
        """OCR `images` (one or a list, one `<image>` placeholder each in `prompt`) and return the `Result`:
        text, token ids, usage, finish reason and per-stage `timings_ms`."""
        result = self.pipeline.run(self._request(images, prompt, overrides), cancel)
        self._remember(result)
        return result

    def stream(self, images: ImageInput | Sequence[ImageInput] | None = None, prompt: str | None = None,
               cancel: threading.Event | None = None, **overrides: Any) -> Iterator[str]:
        """The answer as text pieces while it is generated; afterwards `last_result` holds the `Result`.

        Inputs are checked (and images read) before this returns, so mistakes raise here, not mid-iteration.
        Setting `cancel` stops generation between tokens (finish_reason "cancelled").
        """
        request = self._request(images, prompt, overrides)
        return self._pieces(request, cancel)

    def _pieces(self, request: Request, cancel: threading.Event | None) -> Iterator[str]:
        for event in self.pipeline.stream(request, cancel):
            if isinstance(event, TextDelta):
                if event.text:
                    yield event.text
            else:
                self._remember(event)

    def map(self, inputs: Iterable[ImageInput], batch_size: int = 1, *, prompt: str | None = None,
            return_errors: bool = False, **overrides: Any) -> Iterator[Result | UserError]:
        """OCR many independent images, each its own answer: a generator of `Result`s in input order, each as
        soon as it and every earlier one are done, `batch_size` decoded together (one vision pass for the
        images admitted together). `inputs` is any iterable (pulled lazily: a generator of pages is read only
        as the batch has room) of what `__call__` takes for one image, all with the same `prompt` (one
        <image>; default: the model's). Options are checked before this returns.

        An input that fails (unreadable image, a PDF, a prompt the model refuses) raises its `UserError` when
        its turn comes, after the earlier results were yielded; with `return_errors=True` the error is yielded
        in its place instead and the run goes on.
        """
        from .documents import map_in_order  # noqa: PLC0415

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}", param="batch_size")
        text = self._prompt(prompt, 1, overrides)
        request_overrides = self._overrides(overrides)

        def request_for(source: ImageInput) -> Request:
            return Request(text, [_load(source)], self.model, dict(request_overrides))

        return self._mapped(map_in_order(self.pipeline, inputs, request_for, batch_size), return_errors)

    def _mapped(self, outcomes: Iterator[tuple[Any, Any]], return_errors: bool) -> Iterator[Result | UserError]:
        for _, outcome in outcomes:
            if isinstance(outcome, UserError):
                if not return_errors:
                    raise outcome
            else:
                self._remember(outcome)
            yield outcome

    def pdf(self, source: PdfSource, pages: str | None = None, *, dpi: int = DEFAULT_DPI,
            prompt: str | None = None, password: str | None = None, progress: bool = False,
            cancel: threading.Event | None = None, **overrides: Any) -> list[Result]:
        """OCR the selected pages of a PDF ("1-3,5" style, 1-based; all by default), one page per request
        with the same prompt; one `Result` per page, in the order selected. See `iter_pdf` for details."""
        return [result for _, result in self.iter_pdf(source, pages, dpi=dpi, prompt=prompt, password=password,
                                                      progress=progress, cancel=cancel, **overrides)]

    def iter_pdf(self, source: PdfSource, pages: str | None = None, *, dpi: int = DEFAULT_DPI,
                 prompt: str | None = None, password: str | None = None, progress: bool = False,
                 cancel: threading.Event | None = None, **overrides: Any) -> Iterator[tuple[int, Result]]:
        """(page number, `Result`) for each selected page as soon as it is read; one page image in memory.

        `source` is a path, an http(s) URL, bytes or a binary stream. Pages are rendered at `dpi` (144, as the
        official DeepSeek-OCR PDF script). `progress` shows a page bar on stderr. The file, the range and the
        prompt are checked before this returns. A set `cancel` stops after the page being read.
        """
        if isinstance(source, str) and source.startswith(_URL_PREFIXES):
            source = _fetch(source)
        text = self._prompt(prompt, 1, overrides)
        request_overrides = self._overrides(overrides)
        label = Path(source).name if isinstance(source, (str, os.PathLike)) else "pages"
        pages_iter = iter_pages(source, pages, dpi, password=password, progress=progress, label=label)
        return self._pdf_results(pages_iter, text, request_overrides, cancel)

    def _pdf_results(self, pages_iter: PageReader, text: str, overrides: dict[str, Any],
                     cancel: threading.Event | None) -> Iterator[tuple[int, Result]]:
        try:
            for number, image in pages_iter:
                result = self.pipeline.run(Request(text, [image], self.model, dict(overrides)), cancel)
                self._remember(result)
                yield number, result
                if cancel is not None and cancel.is_set():
                    return
        finally:
            pages_iter.close()  # the PDF is closed now, even when the caller stops early

    # ------------------------------------------------------------------------------------------ helpers
    def _request(self, images: ImageInput | Sequence[ImageInput] | None, prompt: str | None,
                 overrides: dict[str, Any]) -> Request:
        sources = _as_list(images)
        text = self._prompt(prompt, len(sources), overrides)
        return Request(text, [_load(source) for source in sources], self.model, self._overrides(overrides))

    def _prompt(self, prompt: str | None, n_images: int, overrides: dict[str, Any]) -> str:
        """The prompt text for `n_images`, the CLI's defaults and checks included."""
        _check_model_options(self.model, overrides)
        options = {**self._family_options, **{k: v for k, v in overrides.items() if k in _FAMILY_OPTIONS}}
        if prompt is not None and not isinstance(prompt, str):
            raise UserError(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
        return self.family.user_prompt(prompt, n_images, options, param="prompt")

    def _overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = [key for key in overrides if key not in INFERENCE_RULES and key not in REQUEST_ONLY_KEYS]
        if unknown:
            known = ", ".join((*INFERENCE_RULES, *REQUEST_ONLY_KEYS))
            raise UserError(f"unknown option {unknown[0]!r} (known: {known})", param=unknown[0])
        checked = {key: (_checked(key, value) if key in INFERENCE_RULES else value)
                   for key, value in overrides.items()}
        # A call's temperature/top_p/top_k without sampling on: one warning line (the rule of every front end).
        given = {key: value for key, value in checked.items() if key in INFERENCE_RULES}
        warn_ignored_sampling(self.settings.inference.with_overrides(given), given)
        return checked

    def _remember(self, result: Result) -> None:
        with self._lock:
            self.last_result = result


def _checked(key: str, value: Any) -> Any:
    """`value` checked by the config rule of [inference] `key` (Python values: no "true"/"8" strings)."""
    try:
        return check_value("inference", key, value)
    except InvalidValue as error:
        raise UserError(f"{key}: {error}", param=key) from None


def _check_model_options(model: str, options: dict[str, Any]) -> None:
    check_family_options(model, options, hint=lambda owner: f"use OCR({owner.id!r})")


def _as_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # type: ignore[list-item]


def _load(source: ImageInput) -> Image.Image:
    """One image input as a PIL image (files and bytes through `common.images.open_image`, as the CLI does)."""
    if isinstance(source, Image.Image):
        return source  # the pipeline converts non-RGB modes as the official loaders do
    if isinstance(source, str) and source.startswith(_URL_PREFIXES):
        source = _fetch(source)
    if isinstance(source, (str, os.PathLike)):
        source = Path(source).expanduser()
        if is_pdf_file(source):
            raise UserError(f"{source} is a PDF: read it with OCR.pdf(), one page at a time", param="images")
    elif isinstance(source, (bytes, bytearray)):
        if is_pdf(source):
            raise UserError("these bytes are a PDF: read them with OCR.pdf(), one page at a time", param="images")
    elif not hasattr(source, "read"):
        raise UserError(f"an image must be a path, URL, bytes, binary stream or PIL image, not "
                        f"{type(source).__name__}", param="images")
    return open_image(source)


def _fetch(url: str) -> bytes:
    # The CLI's fetch: a total deadline and a size cap, failures as one-line ImageErrors.
    from .cli import _fetch as fetch_url  # noqa: PLC0415

    return fetch_url(url)
