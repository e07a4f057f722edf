"""`deepseek-ocr-cli`: OCR from a shell. A thin front end: parse flags, open images, drive the pipeline, print.

Fire dispatches one function with explicit parameters (`ocr`). In front of Fire, `main` normalises the command
line so that it behaves like an ordinary CLI: `--image` may repeat, values stay the strings the user typed (Fire
would turn `--prompt 2024` into an int and `--prompt True` into a bool), unknown options and `--help` are
handled here, and every user mistake ends in ONE line on stderr with exit status 2 (internal faults: exit 1, with
the traceback only when DEEPSEEK_OCR_DEBUG=1). Values are then checked by the config rules, so a bad flag reads
the same as a bad config.toml key.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence, TextIO

HELP = """\
deepseek-ocr-cli: read text from document images with DeepSeek-OCR or PaddleOCR-VL, locally.

Usage:
  deepseek-ocr-cli FILE|FOLDER|PDF... [--output-dir DIR] [options]
      documents: every file, folder entry, PDF page and TIFF frame is read on its own, ONE ANSWER PER PAGE
  deepseek-ocr-cli --image PAGE [--image PAGE2 ...] [--prompt TEXT] [options]
      one request: ONE ANSWER for all its images, the prompt has one <image> per --image
  deepseek-ocr-cli render RAW.txt --image PAGE [--output-dir DIR] [--format text|json] [--label text]
      the post-processing of a run (Markdown, blocks, annotated page, figures) on model text made elsewhere
  deepseek-ocr-cli convert --quantize 4|8 --output DIR [--model ID | --model-dir DIR] [--backend B] [--group-size 64]
                          [--dtype bfloat16] [--vision]
      write a pre-quantized snapshot for the backend (default: as --backend auto picks; the layouts differ);
      run it later with --model-dir DIR --backend B

Examples:
  deepseek-ocr-cli scans/*.png report.pdf --output-dir out
      each page its own answer, written to out/<document>/ as it finishes (see Output)
  deepseek-ocr-cli scans/ --recursive --format jsonl > pages.jsonl
      every image and PDF under scans/, sorted; one JSON line per page as it finishes
  deepseek-ocr-cli scans/ --output-dir out --resume
      after Ctrl-C or a crash: finished pages are skipped, the rest is read
  deepseek-ocr-cli --image page.png
      Markdown of the page with layout boxes (the default DeepSeek-OCR prompt,
      "<image>\\n<|grounding|>Convert the document to markdown.").
  deepseek-ocr-cli --image page.png --prompt "<image>\\nFree OCR."
      Plain text, no layout boxes.
  deepseek-ocr-cli --image a.png --image b.png --prompt "<image> <image>\\nCompare the two pages."
      One --image per <image> placeholder, in order.
  deepseek-ocr-cli --image page.png --prompt "<image>\\nLocate <|ref|>the total<|/ref|> in the image."
  deepseek-ocr-cli --model paddleocr-vl --image table.png --task table
  deepseek-ocr-cli --prompt "What is OCR?"                      (text only)
  deepseek-ocr-cli --pdf report.pdf --pages 1-3 > report.md
      Each page read on its own with the default prompt; a "<!-- page N -->" line before each.
  deepseek-ocr-cli --image page.png --format json --logprobs 5 --max-new-tokens 64
  deepseek-ocr-cli --image page.png --bench --ignore-eos --max-new-tokens 256

Input (documents, each page its own answer):
  FILE|FOLDER|URL ...   images (PNG, JPEG, WebP, BMP, GIF, TIFF: every frame a page), PDFs, folders (their images
                        and PDFs, sorted by name), shell globs; all share one prompt with one <image> (the page).
                        A name starting with -- goes after a lone --
  --recursive           folders: also read their subfolders
  --batch-size N        pages decoded together (default: what the KV cache lets fit in half the free memory,
                        at most 8 on a GPU, 4 on a CPU); 1 streams each answer token by token
Input (one request, one answer):
  --image PATH|URL      an image file or an http(s) URL; repeat once per <image> placeholder, in order
                        (several --image need --prompt with as many <image>; a lone --image that is a PDF,
                        or with --output-dir/--format jsonl, is read as a document)
  --prompt TEXT         the prompt; <image> marks where each image goes; "\\n" is a newline
  --prompt-file PATH    read the prompt from a file (verbatim)
  --pdf PATH|URL        a PDF: every selected page is read on its own, one request per page, all with the
                        same prompt (one <image>). An --image that is a PDF (by .pdf name or content) does the
                        same; a PDF comes alone, without other images
  --pages LIST          PDF/TIFF pages to read, 1-based, e.g. 1-3,5 or 4- (to the end); default: all
  --dpi N               PDF render resolution, 18 to 1200 (144, as the official DeepSeek-OCR PDF script)
                        Default prompt with images: DeepSeek-OCR "<image>\\n<|grounding|>Convert the document to
                        markdown.", PaddleOCR-VL "OCR:".

Model and files:
  --model ID            deepseek-ocr (default) or paddleocr-vl
  --model-dir DIR       a local snapshot folder (config.json, tokenizer.json, *.safetensors)
  --model-config PATH   the model's config.json   --tokenizer PATH   tokenizer.json   --weights PATH   .safetensors
  --config PATH         settings file (default: the per-user config.toml, created with comments on first run)
  --backend B           auto (MLX on Apple Silicon, PyTorch elsewhere) | torch | mlx
  --device D            auto | cpu | cuda | metal
  --dtype T             auto | float32 | bfloat16 | float16
  --quantize N          quantize the decoder to 4 or 8 bits at load time (vision stays float); torch: 8 bits
                        per output channel, 4 bits in groups; MLX: both in groups
  --quantize-group-size N   weights per quantization group: 32 | 64 (default) | 128 (torch: 4 bits only)

DeepSeek-OCR:
  --mode M              tiny | small | base | large | gundam: a preset of the three sizes below
  --base-size N         global view size (1024)       --image-size N   tile size (640)
  --crop-mode B         true: tile large pages (default); false: one view only
  --template T          plain (official, default) | deepseek | deepseekv2
  --repetition-guard B  vLLM recipe's guard: no repeated 30-gram within 90 tokens, table cells exempt

PaddleOCR-VL:
  --task T              ocr | table | formula | chart (replaces the prompt text)

Generation:
  --max-new-tokens N    cap on generated tokens, end-of-text included (512)
  --use-cache B         false recomputes the whole sequence per token (slow; for checks)
  --do-sample B         false: greedy (official); true: sample with the options below
  --temperature X  --top-p X  --top-k N  --repetition-penalty X  --seed N
                        (temperature, top-p and top-k need --do-sample true: without it, a warning line)
  --no-repeat-ngram-size N   ban repeating any N-gram (DeepSeek-OCR default 20; 0 = off)
  --ignore-eos          keep generating past end-of-text, up to --max-new-tokens (benchmarks)

Output:
  --format F            text (default): the answer streams to stdout, statistics go to stderr
                        json: one JSON object (text, token_ids, usage, timings_ms, ...) on stdout; for
                        documents {"input", "page_count", "pages": [...], "failed", "flagged"} (several
                        documents: {"documents": [...], ...}), printed with the finished pages even on Ctrl-C
                        jsonl: one JSON object per page as it finishes (a failed page: {"input","page","error"})
                        A document's page objects hold text, markdown, blocks [{label, text, box: [x1, y1, x2,
                        y2] in page pixels}], finish_reason and looped (the answer ends in a repetition loop)
  --output-dir DIR      per document DIR/<name>/: page-0001.txt (raw), .md (figures linked), .json (blocks and
                        counts), .annotated.jpg (boxes drawn), images/ (figure crops), result.md, result.json.
                        Each file is written whole as its page finishes; existing results are never replaced
  --resume              skip pages an earlier run finished (same input bytes and settings); rerun the rest
  --overwrite           replace existing results in DIR
                        Pages that hit --max-new-tokens (finish "length") or looped are named in the summary;
                        a page that cannot be read is reported, the others go on, and the run exits 2
                        Documents in text mode: each page's answer after a "<!-- page N -->" line (several
                        documents: "<!-- NAME page N -->"); a bar with pages and pages/minute on stderr unless
                        the answer streams to a terminal (TQDM_DISABLE=1 hides it)
  --logprobs N          with --format json: the N most likely tokens per generated token (raw log-probabilities)
  --clean               strip grounding boxes: print clean Markdown (json: adds "markdown" and "grounding")
  --bench               after the answer, print per-stage timings and tokens/s to stderr

--version prints the version. Booleans accept true/false (also yes/no, 1/0); a bare flag means true. Options use dashes; underscores work too.
Errors print one line and exit with status 2 (your input) or 1 (internal; DEEPSEEK_OCR_DEBUG=1 shows the trace).
"""

EXIT_USER, EXIT_INTERNAL = 2, 1
DEBUG_ENV = "DEEPSEEK_OCR_DEBUG"
#: A URL --image is fetched with this total deadline and size cap (as the server's defaults).
URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 20 * 1024 * 1024

log = logging.getLogger("deepseek_ocr.cli")


def ocr(prompt: str | None = None, prompt_file: str | None = None, image: Sequence[str] = (),
        pdf: str | None = None, pages: str | None = None, dpi: str | None = None,
        model: str | None = None, model_dir: str | None = None, model_config: str | None = None,
        tokenizer: str | None = None, weights: str | None = None, config: str | None = None,
        backend: str | None = None, device: str | None = None, dtype: str | None = None,
        template: str | None = None, base_size: str | None = None, image_size: str | None = None,
        crop_mode: str | None = None, mode: str | None = None, task: str | None = None,
        max_new_tokens: str | None = None, use_cache: str | None = None, do_sample: str | None = None,
        temperature: str | None = None, top_p: str | None = None, top_k: str | None = None,
        repetition_penalty: str | None = None, no_repeat_ngram_size: str | None = None,
        seed: str | None = None, repetition_guard: str | None = None, quantize: str | None = None,
        quantize_group_size: str | None = None, ignore_eos: str | bool = False,
        logprobs: str | int = 0, format: str = "text", bench: str | bool = False,
        clean: str | bool = False, inputs: Sequence[str] = (), output_dir: str | None = None,
        resume: str | bool = False, overwrite: str | bool = False, recursive: str | bool = False,
        batch_size: str | None = None) -> None:
    """OCR images with a local model (see `deepseek-ocr-cli --help`). Values arrive as the strings typed.

    Two ways in, never mixed: `inputs` (bare arguments: files, folders, globs, PDFs) are documents, every page
    its own answer; `image` (`--image`, repeatable) is ONE request whose prompt has an `<image>` per image."""
    from .config import _flag as flag_name, load_settings  # noqa: PLC0415 - keeps `--help` instant
    from .errors import UserError  # noqa: PLC0415
    from .models import check_family_options, get_family, model_options  # noqa: PLC0415
    from .pipeline import Pipeline, Request  # noqa: PLC0415

    out_format = _choice("format", format, ("text", "json", "jsonl"))
    want_bench, want_clean = _bool("bench", bench), _bool("clean", clean)
    n_logprobs = _int("logprobs", logprobs, low=0)
    if n_logprobs and out_format == "text":
        raise UserError("--logprobs needs --format json")
    from .cli_documents import RunOptions, documents_named, ocr_documents  # noqa: PLC0415

    run_options = RunOptions(output_dir=Path(output_dir).expanduser() if output_dir else None,
                              resume=_bool("resume", resume), overwrite=_bool("overwrite", overwrite),
                              recursive=_bool("recursive", recursive),
                              batch_size=None if batch_size is None else _int("batch-size", batch_size, low=1),
                              out_format=out_format, clean=want_clean, bench=want_bench)
    inputs = documents_named(list(inputs), list(image), pdf, run_options)
    flags = {"model": model, "model_dir": model_dir, "model_config": model_config, "tokenizer": tokenizer,
             "weights": weights, "backend": backend, "device": device, "dtype": dtype, "template": template,
             "base_size": base_size, "image_size": image_size, "crop_mode": crop_mode, "mode": mode, "task": task,
             "max_new_tokens": max_new_tokens, "use_cache": use_cache, "do_sample": do_sample,
             "quantize": quantize, "quantize_group_size": quantize_group_size,
             "temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty,
             "no_repeat_ngram_size": no_repeat_ngram_size, "seed": seed, "repetition_guard": repetition_guard}
    settings = load_settings(Path(config).expanduser() if config else None, flags)
    model_id = settings.active_model
    family = get_family(model_id)
    family_flags = {option.name: flags.get(option.name) for option in model_options()}
    check_family_options(model_id, family_flags, flag=flag_name, hint=lambda owner: f"add --model {owner.id}")

    if inputs:
        text = _prompt_text(prompt, prompt_file)
        if text is not None and text.count("<image>") > 1:
            raise UserError("each page is read on its own: the prompt takes one <image> (the page); several "
                            "images in ONE prompt are given with --image, once per <image>")
        text = family.user_prompt(text, 1, family_flags)
        overrides = {"ignore_eos": _bool("ignore-eos", ignore_eos), "logprobs": n_logprobs}
        ocr_documents(settings, inputs, text, overrides, pages, dpi, family_flags.get("task"), run_options)
        return
    if len(image) > 1 and prompt is None and prompt_file is None:
        raise UserError(f"{len(image)} --image go into ONE prompt (one <image> each): give that prompt with "
                        "--prompt; to read each file on its own, list them without --image: "
                        "deepseek-ocr-cli a.png b.png")
    if pages is not None or dpi is not None:
        raise UserError("--pages and --dpi are PDF options: add --pdf FILE (or an --image that is a PDF)")
    text = _prompt_text(prompt, prompt_file)
    if text is None and not image:
        raise UserError("nothing to do: give files to read, --image, --pdf, --prompt or --prompt-file (see --help)")
    text = family.user_prompt(text, len(image), family_flags)
    sources = [_read_input(source) for source in image]
    pipeline = Pipeline(settings, max_resident=1)
    overrides = {"ignore_eos": _bool("ignore-eos", ignore_eos), "logprobs": n_logprobs}
    from .images import open_image  # noqa: PLC0415

    images = [open_image(source) for source in sources]
    request = Request(prompt=text, images=images, model=model_id, overrides=overrides)
    started = time.perf_counter()
    result = _print_answer(pipeline, request, out_format, want_clean, images)
    wall_s = time.perf_counter() - started
    if out_format == "text":
        print(f"[{result.model} {result.backend}/{result.device}/{result.dtype}] {result.prompt_tokens} prompt + "
              f"{result.completion_tokens} generated tokens, finish: {result.finish_reason}, {wall_s:.2f} s",
              file=sys.stderr)
    if want_bench:
        print(_bench_table(result), file=sys.stderr)


def _print_answer(pipeline: Any, request: Any, out_format: str, clean: bool, images: list) -> Any:
    """Stream (text mode, unless --clean needs the whole answer) or collect and print one JSON object."""
    result = _answer(pipeline, request, out_format, clean)
    if out_format != "text":  # one answer: jsonl is the same object on its one line
        json.dump(_as_json(result, clean, images), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return result


def _answer(pipeline: Any, request: Any, out_format: str, clean: bool) -> Any:
    """Run `request`; in text mode print the answer (streamed, unless --clean needs it whole). The `Result`."""
    from .pipeline import Result  # noqa: PLC0415

    streaming = out_format == "text" and not clean
    result = None
    for event in pipeline.stream(request):
        if isinstance(event, Result):
            result = event
        elif streaming and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    assert result is not None
    if streaming:
        if result.text and not result.text.endswith("\n"):
            sys.stdout.write("\n")
    elif out_format == "text":
        sys.stdout.write(_clean(result.text) + "\n")
    sys.stdout.flush()
    return result


def _summed(results: list[Any]) -> Any:
    """One `Result` whose token counts and stage timings are the sums over `results` (for the statistics)."""
    import dataclasses  # noqa: PLC0415

    timings: dict[str, float] = {}
    calls: dict[str, int] = {}
    for result in results:
        for stage, ms in result.timings_ms.items():
            timings[stage] = timings.get(stage, 0.0) + ms
        for stage, count in result.timing_calls.items():
            calls[stage] = calls.get(stage, 0) + count
    return dataclasses.replace(results[-1], prompt_tokens=sum(r.prompt_tokens for r in results),
                               completion_tokens=sum(r.completion_tokens for r in results),
                               timings_ms=timings, timing_calls=calls)


def _clean(text: str) -> str:
    from .output import clean_markdown  # noqa: PLC0415

    return clean_markdown(text, image_link=lambda i: f"![](images/{i}.jpg)\n")


def _as_json(result: Any, clean: bool, images: list) -> dict[str, Any]:
    data: dict[str, Any] = {
        "text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
        "model": result.model, "backend": result.backend, "device": result.device, "dtype": result.dtype,
        "timings_ms": result.timings_ms,
    }
    if result.logprobs is not None:
        data["logprobs"] = [
            {"token_id": t.token_id, "logprob": t.logprob,
             "top_logprobs": [{"token_id": e.token_id, "logprob": e.logprob} for e in t.top_logprobs]}
            for t in result.logprobs]
    if clean:
        from .output import parse_grounding  # noqa: PLC0415

        # Pixel boxes only when the answer can refer to a single page.
        size = images[0].size if len(images) == 1 else None
        data["markdown"] = _clean(result.text)
        data["grounding"] = [ref.as_dict(size) for ref in parse_grounding(result.text)]
    return data


def _bench_table(result: Any, pages: int = 1) -> str:
    from .timing import Timings  # noqa: PLC0415

    timings = Timings(total_ms=dict(result.timings_ms), counts=dict(result.timing_calls))
    lines = [timings.table()]
    prefill_ms = result.timings_ms.get("decode.prefill", 0.0)
    iterative_ms = result.timings_ms.get("decode.iterative", 0.0)
    if prefill_ms > 0:
        lines.append(f"prefill: {result.prompt_tokens / (prefill_ms / 1000):.1f} tokens/s "
                     f"({result.prompt_tokens} tokens)")
    steps = max(result.completion_tokens - pages, 0)  # each page's first token comes out of its prefill
    if iterative_ms > 0 and steps:
        lines.append(f"decode: {steps / (iterative_ms / 1000):.1f} tokens/s ({steps} steps)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- values
def _user_error(message: str) -> Exception:
    from .errors import UserError  # noqa: PLC0415

    return UserError(message)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise _user_error(f"--{name.replace('_', '-')}: {value!r} is not allowed (allowed: true | false)")


def _int(name: str, value: Any, low: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < low or isinstance(value, bool):
        raise _user_error(f"--{name}: {value!r} is not allowed (allowed: an integer >= {low})")
    return number


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _user_error(f"--{name}: {value!r} is not allowed (allowed: {' | '.join(allowed)})")
    return value


def _dpi(value: str) -> int:
    from .pdf import MAX_DPI, MIN_DPI, check_dpi  # noqa: PLC0415

    text = str(value).strip()
    number = int(text) if text.isdigit() else None
    # Out of range, the typed string goes to the check, so the message quotes it as the other flags do.
    return check_dpi(number if number is not None and MIN_DPI <= number <= MAX_DPI else value, "--dpi")


def _prompt_text(prompt: str | None, prompt_file: str | None) -> str | None:
    if prompt is not None and prompt_file is not None:
        raise _user_error("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return Path(prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _user_error(f"--prompt-file: cannot read {prompt_file}: {getattr(exc, 'strerror', None) or exc}")
    if prompt is not None:
        # Shells pass "\n" as two characters; the documented prompts need a real newline there.
        return prompt.replace("\\n", "\n")
    return None


def _read_input(source: str) -> bytes | Path:
    """An --image/--pdf value as something to decode: a URL's bytes (fetched now), else the path."""
    if source.startswith(("http://", "https://")):
        return _fetch(source)
    return Path(source).expanduser()


def _fetch(url: str, timeout_s: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """GET an image URL with a total deadline and a size cap; failures are one-line `ImageError`s."""
    import httpx  # noqa: PLC0415

    from .errors import ImageError  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                          follow_redirects=True, max_redirects=5) as client:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"cannot fetch {url}: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise ImageError(f"image at {url} is over the {max_bytes} byte limit")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageError(f"image at {url} is over the {max_bytes} byte limit")
                    if time.monotonic() > deadline:  # httpx's read timeout is per read, not total
                        raise ImageError(f"cannot fetch {url}: no complete answer within {timeout_s:.0f} s")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None


def convert(output: str | None = None, quantize: str | None = None, group_size: str = "64",
            vision: str | bool = False, backend: str | None = None, dtype: str = "bfloat16", model: str | None = None,
            model_dir: str | None = None, model_config: str | None = None, tokenizer: str | None = None,
            weights: str | None = None, config: str | None = None) -> None:
    """`deepseek-ocr-cli convert --quantize 4|8 --output DIR`: write a pre-quantized snapshot of a model
    (downloaded on first use, or --model-dir) that later loads as a plain `--model-dir DIR --backend B`.

    The backend is chosen as for a run (`--backend`, else config.toml, else auto): its snapshot layout is its
    own (torch_ocr/quantize.py says why), so the snapshot is written for the backend that will load it."""
    import importlib  # noqa: PLC0415

    from .assets import resolve_model_files  # noqa: PLC0415
    from .config import load_settings  # noqa: PLC0415
    from .errors import UserError  # noqa: PLC0415
    from .pipeline import backend_loader, choose_backend  # noqa: PLC0415

    if not output or quantize is None:
        raise UserError("convert needs --quantize 4|8 and --output DIR (see --help)")
    bits = _int("quantize", quantize, low=1)
    groups = _int("group-size", group_size, low=1)
    flags = {"model": model, "model_dir": model_dir, "model_config": model_config, "tokenizer": tokenizer,
             "weights": weights, "backend": backend}
    settings = load_settings(Path(config).expanduser() if config else None, flags)
    name = choose_backend(settings.inference.backend)
    backend_loader(name)  # a clear "install the extra" before any download
    files = resolve_model_files(settings.active_model, settings.entry())
    # The backend's framework is imported only when converting.
    convert_snapshot = importlib.import_module(f"{name}_ocr.quantize").convert

    target = Path(output).expanduser()
    sizes = convert_snapshot(Path(files.directory), target, bits=bits, group_size=groups,
                             kind=settings.active_model, vision=_bool("vision", vision),
                             dtype=_choice("dtype", dtype, ("bfloat16", "float32", "float16")))
    print(f"wrote {bits}-bit {settings.active_model} to {target} for the {name} backend: weights "
          f"{sizes['before'] / 2**30:.2f} GiB -> {sizes['after'] / 2**30:.2f} GiB; run it with --model-dir "
          f"{target} --backend {name}", file=sys.stderr)


def render(text_file: Sequence[str] = (), image: Sequence[str] = (), output_dir: str | None = None,
           format: str = "text", overwrite: str | bool = False, page: str = "1", label: str = "text",
           config: str | None = None) -> None:
    """`deepseek-ocr-cli render RAW.txt --image PAGE [--output-dir DIR]`: the post-processing of a run (Markdown,
    blocks in page pixels, annotated page, figure crops) on model text produced elsewhere; no model loads."""
    from .cli_documents import render as render_page  # noqa: PLC0415
    from .errors import UserError  # noqa: PLC0415

    if len(text_file) != 1 or len(image) != 1:
        raise UserError("render needs one model text file and one --image (the page it was read from): "
                        "deepseek-ocr-cli render RAW.txt --image PAGE [--output-dir DIR]")
    render_page(text_file[0], image[0], output_dir, _choice("format", format, ("text", "json")),
                _bool("overwrite", overwrite), _int("page", page, low=1), label)


# ----------------------------------------------------------------------------------------------- argv
_PARAMS = tuple(inspect.signature(ocr).parameters)
_CONVERT_PARAMS = tuple(inspect.signature(convert).parameters)
_RENDER_PARAMS = tuple(inspect.signature(render).parameters)
_BARE_TRUE = ("bench", "ignore_eos", "clean", "crop_mode", "use_cache", "do_sample", "repetition_guard", "vision",
              "resume", "overwrite", "recursive")


def normalize_argv(argv: Sequence[str], params: Sequence[str] = _PARAMS, positional: str | None = "inputs"
                   ) -> list[str]:
    """Rewrite the user's argv into Fire arguments that keep every value a string (`--key='value'`), gather
    the repeated `--image` and the bare arguments (into `positional`; None: refused), and refuse unknown options
    with one clear line. After `--` every word is a bare argument (a file named like an option)."""
    values: dict[str, Any] = {}
    images: list[str] = []
    bare: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            bare += args[index:]
            break
        if not arg.startswith("--") or arg == "--":
            if positional is None:
                raise _user_error(f"unexpected argument {arg!r}; every option starts with -- (see --help)")
            bare.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key not in params:
            raise _user_error(f"unknown option --{name} (see --help)")
        if not has_value:
            if index < len(args) and not args[index].startswith("--"):
                value, index = args[index], index + 1
            elif key in _BARE_TRUE:
                value = "true"
            else:
                raise _user_error(f"--{name} needs a value")
        if key == "image":
            images.append(value)
            continue
        if key in values:
            raise _user_error(f"--{name} is given twice")
        values[key] = value
    fire_args = [f"--{key}={value!r}" for key, value in values.items()]
    if images:
        fire_args.append(f"--image={images!r}")
    if bare:
        fire_args.append(f"--{positional}={bare!r}")
    return fire_args


def _run(argv: Sequence[str]) -> None:
    import fire  # noqa: PLC0415

    if argv and argv[0] == "convert":
        fire.Fire(convert, command=normalize_argv(argv[1:], _CONVERT_PARAMS, None), name="deepseek-ocr-cli convert")
        return
    if argv and argv[0] == "render":
        fire.Fire(render, command=normalize_argv(argv[1:], _RENDER_PARAMS, "text_file"),
                  name="deepseek-ocr-cli render")
        return
    fire.Fire(ocr, command=normalize_argv(argv), name="deepseek-ocr-cli")


def main(argv: Sequence[str] | None = None, *, stderr: TextIO | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 user error, 1 internal error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    err = stderr or sys.stderr
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, stream=err,
                        format="%(levelname)s: %(message)s")
    if any(a in ("--help", "-h", "-help") for a in argv) or argv == ["help"]:
        sys.stdout.write(HELP)
        return 0
    if "--version" in argv:
        print(f"deepseek-ocr-cli {package_version()}")
        return 0
    from .errors import UserError  # noqa: PLC0415

    try:
        _run(argv)
        return 0
    except UserError as exc:
        print(f"error: {_one_line(str(exc))}", file=err)
        return EXIT_USER
    except KeyboardInterrupt:
        print("error: interrupted", file=err)
        return 130
    except BrokenPipeError:  # `| head` closed stdout: not an error of ours
        return 0
    except SystemExit as exc:  # Fire's own argument errors (it prints its usage first)
        return exc.code if isinstance(exc.code, int) else EXIT_USER
    except Exception as exc:  # noqa: BLE001 - the one place that turns internal faults into an exit status
        if debug:
            traceback.print_exc(file=err)
        print(f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=err)
        return EXIT_INTERNAL


def package_version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" when it runs from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("deepseek-ocr")
    except PackageNotFoundError:
        return "unknown"


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


if __name__ == "__main__":
    raise SystemExit(main())
