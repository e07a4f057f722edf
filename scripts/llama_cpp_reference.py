"""llama.cpp as an optional reference: the same random-weight snapshot, page and token count through `llama-mtmd-cli`.

    python scripts/llama_cpp_reference.py --model paddleocr-vl --checkpoint DIR --max-new-tokens 32
    python scripts/bench.py --model paddleocr-vl --llama-cpp          # its BF16 and Q8_0 rows beside ours

llama.cpp is taken from llama-cpp-python's source distribution (a pinned version, fetched with pip), whose vendored
tree holds the C++ sources, `convert_hf_to_gguf.py` and the `gguf` Python package. Everything lives in the user
cache dir next to the bench checkpoints (`.../deepseek-ocr/llama-cpp/`) and is made once: the unpacked sources,
a CPU Release build of the one target needed (`llama-mtmd-cli`; needs cmake and a C++ compiler, 20-35 minutes
on two cores, 20 MB beside 220 MB of sources), a small venv for the converter (the interpreter's own packages, torch included, are
visible in it, so only what it lacks is installed there), and the GGUF files per snapshot (text model BF16 and
Q8_0, the vision part as one BF16 mmproj file shared by both).

The snapshot directory is never written to: the converter reads a staging folder of links to its files, plus the
small files the converter expects and our snapshots lack (PaddleOCR-VL: a SentencePiece `tokenizer.model` made
from the stand-in `tokenizer.json`; DeepSeek-OCR: a processor config with the image mean/std). The figures come
from its own log (`--perf -lv 4`): the vision encode per image slice, the prompt evaluation (the image embeddings
and the prompt text through the decoder) and the decode, plus the process's peak RSS from `wait4`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The llama-cpp-python release whose vendored llama.cpp is measured (its sdist carries the whole C++ tree).
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
BINARY = "llama-mtmd-cli"
#: A CPU Release build of only what the CLI links; no tests, examples, server or HTTPS (nothing is downloaded).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON")
#: Text-model GGUF types measured: `--outtype` of the converter -> the label in the bench table.
OUTTYPES = {"bf16": "BF16", "q8_0": "Q8_0"}
#: Bytes per weight of each text type, for the decode bandwidth: Q8_0 stores 32 int8 weights and one fp16 scale.
BYTES_PER_WEIGHT = {"bf16": 2.0, "q8_0": 34 / 32}
#: The vision tower and projector are converted once at this type and shared by every text-model type.
MMPROJ_OUTTYPE = "bf16"
#: Modules the converter imports beyond the standard library and the vendored `gguf` package -> pip name.
CONVERTER_MODULES = {"torch": "torch", "numpy": "numpy", "sentencepiece": "sentencepiece",
                     "transformers": "transformers", "google.protobuf": "protobuf", "yaml": "pyyaml",
                     "tqdm": "tqdm", "requests": "requests", "safetensors": "safetensors"}
#: What mtmd-cli puts the image's embeddings at (it prepends one when the prompt has none).
MEDIA_MARKER = "<__media__>"
#: Context length given to the CLI: room for the page's image tokens and the new tokens, and a KV cache that
#: stays small (its default is the model's full training context).
CONTEXT = 4096


@dataclass(frozen=True)
class ModelSpec:
    """How llama.cpp runs one of our models: its chat template and the files its converter wants."""

    template_args: tuple[str, ...]
    shim: str          # "tokenizer.model" | "processor_config" | "none"


#: The models wired here. Its converter also registers DeepSeek-OCR-2, GLM-OCR and (by the v1 architecture name)
#: PaddleOCR-VL 1.5, which are not wired or checked yet.
MODELS: dict[str, ModelSpec] = {
    # DeepSeek-OCR has no chat template of its own; llama.cpp's built-in one passes the text through
    "deepseek-ocr": ModelSpec(("--chat-template", "deepseek-ocr"), "processor_config"),
    # PaddleOCR-VL's template is the snapshot's Jinja one
    "paddleocr-vl": ModelSpec(("--jinja",), "tokenizer.model"),
}

#: Edits to the converter, applied to the unpacked copy in the cache (never to anything of the project):
#: (file under the vendored tree, anchor text, text put after it). Both serve the tiny test snapshots only (at
#: full size they change nothing): the vision converters name tensors by block number only up to the tower's
#: layer count, but tiny DeepSeek-OCR has more SAM blocks than CLIP layers (full size: 12 and 24), and tiny
#: PaddleOCR-VL's 2 layers leave its projector's `mlp_AR.linear_2` (named like block 2) unnamed.
CONVERTER_PATCHES = (
    ("conversion/deepseek.py",
     "        self.clip_projector_type = gguf.VisionProjectorType.DEEPSEEKOCR\n",
     "        # deepseek-ocr bench: name SAM blocks past the CLIP layer count (tiny snapshots have more of them)\n"
     "        self.block_count = max(self.block_count, int(self.hparams['sam']['layers']))\n"
     "        self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.block_count)\n"),
    ("conversion/ernie.py",
     '        self.hparams_vision["image_size"] = int(math.sqrt(self.max_pixels))\n',
     "        # deepseek-ocr bench: name mlp_AR.linear_1/2 even when the tower has fewer layers (tiny snapshots)\n"
     "        self.block_count = max(self.block_count, 3)\n"
     "        self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.block_count)\n"),
)


# ------------------------------------------------------------------------------------------------- places
def cache_dir() -> Path:
    """`.../deepseek-ocr/llama-cpp` in the user cache dir, beside the bench's `bench/` checkpoints."""
    import platformdirs  # noqa: PLC0415 - only this tool needs it

    return Path(platformdirs.user_cache_dir("deepseek-ocr", appauthor=False, opinion=False)) / "llama-cpp"


def _log(message: str) -> None:
    print(f"llama.cpp: {message}", file=sys.stderr, flush=True)


def _run(command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         log: Path | None = None) -> None:
    """Run a preparation step; on failure the tail of its output is the error (a build log is long)."""
    _log("$ " + shlex.join(command))
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{command[0]} exited {done.returncode}:\n{tail}")


# ------------------------------------------------------------------------------------------------- sources
def fetch_sources(cache: Path) -> Path:
    """The vendored llama.cpp tree of the pinned sdist, fetched and unpacked once (patched, see CONVERTER_PATCHES)."""
    tree = cache / f"src-{VERSION}"
    vendored = tree / "vendor" / "llama.cpp"
    if (tree / ".complete").exists():
        patch_converter(vendored)  # a no-op once applied; a patch added since the unpack still gets in
        return vendored
    sdists = cache / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    archive = sdists / f"{SDIST}.tar.gz"
    if not archive.exists():
        _log(f"fetching the llama-cpp-python {VERSION} source distribution (about 75 MB) ...")
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={VERSION}", "--dest", str(sdists)])
    tmp = cache / f"src-{VERSION}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")  # no links or paths outside the folder
        else:  # pragma: no cover - Python before 3.11.4
            tar.extractall(tmp)  # noqa: S202 - an archive pip fetched for this pinned version
    shutil.rmtree(tree, ignore_errors=True)
    (tmp / SDIST).rename(tree)
    shutil.rmtree(tmp, ignore_errors=True)
    patch_converter(vendored)
    (tree / ".complete").write_text("ok\n")
    return vendored


def patch_converter(vendored: Path) -> None:
    """Apply CONVERTER_PATCHES once; an anchor that is gone means the pinned sources changed, which is an error."""
    for relative, anchor, addition in CONVERTER_PATCHES:
        path = vendored / relative
        text = path.read_text(encoding="utf-8")
        if addition in text:
            continue
        if text.count(anchor) != 1:
            raise RuntimeError(f"{relative}: the text to patch after was not found once; update CONVERTER_PATCHES")
        path.write_text(text.replace(anchor, anchor + addition), encoding="utf-8")


def build(cache: Path, vendored: Path, jobs: int | None = None) -> Path:
    """`llama-mtmd-cli`, built once with CMAKE_OPTIONS (a changed option list rebuilds)."""
    out = cache / f"build-{VERSION}"
    binary = out / "bin" / BINARY
    stamp = out / ".options"
    wanted = "\n".join(CMAKE_OPTIONS) + "\n"
    if binary.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake not found: install cmake and a C++ compiler to build llama.cpp")
    out.mkdir(parents=True, exist_ok=True)
    _log(f"building {BINARY} in {out} (once; 20-35 minutes on two cores) ...")
    _run(["cmake", "-S", str(vendored), "-B", str(out), *CMAKE_OPTIONS], log=out / "configure.log")
    _run(["cmake", "--build", str(out), "--target", BINARY, "-j", str(jobs or os.cpu_count() or 2)],
         log=out / "build.log")
    if not binary.exists():
        raise RuntimeError(f"the build finished without {binary}")
    stamp.write_text(wanted, encoding="utf-8")
    return binary


def _site_packages(python: Path) -> list[str]:
    code = ("import json, site, sysconfig; "
            "print(json.dumps([sysconfig.get_paths()['purelib'], *site.getsitepackages()]))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return list(dict.fromkeys(json.loads(done.stdout)))


def converter_python(cache: Path) -> Path:
    """The interpreter of the converter's venv: made once, this interpreter's packages visible behind its own
    (a `.pth` line), so torch is not installed twice; what the converter imports and neither has is installed
    into the venv only."""
    root = cache / "convert-venv"
    python = root / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
    own = _site_packages(python)[0]
    (Path(own) / "deepseek_ocr_parent.pth").write_text(
        "\n".join(p for p in _site_packages(Path(sys.executable)) if p != own) + "\n", encoding="utf-8")
    probe = ("import importlib.util, json, sys\n"
             "def gone(name):\n"
             "    try:\n        return importlib.util.find_spec(name) is None\n"
             "    except ImportError:  # a dotted name whose parent package is missing\n        return True\n"
             "print(json.dumps([m for m in sys.argv[1:] if gone(m)]))")
    done = subprocess.run([str(python), "-c", probe, *CONVERTER_MODULES], capture_output=True, text=True, check=True)
    missing = [CONVERTER_MODULES[m] for m in json.loads(done.stdout)]
    if missing:
        _run([str(python), "-m", "pip", "install", "--quiet", *missing])
    return python


# ------------------------------------------------------------------------------------------------- conversion
def _checkpoint_key(checkpoint: Path) -> str:
    """A folder name for a snapshot's GGUF files: its name and a digest of where it is and its files' sizes and
    times, so a rebuilt snapshot is converted again."""
    resolved = checkpoint.resolve()
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in resolved.iterdir() if p.is_file())
    digest = hashlib.sha256(json.dumps([str(resolved), files]).encode()).hexdigest()[:12]
    return f"{resolved.name}-{digest}"


def stage_checkpoint(checkpoint: Path, model: str, folder: Path) -> Path:
    """A folder of links to the snapshot's files plus the files the converter wants for `model` (see MODELS)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in checkpoint.resolve().iterdir():
        link = folder / source.name
        if source.is_file() and not link.exists():
            link.symlink_to(source)
    shim = MODELS[model].shim
    if shim == "tokenizer.model" and not (folder / "tokenizer.model").exists():
        tokenizer = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(tokenizer))
    if shim == "processor_config" and not any((folder / n).exists() for n in
                                              ("preprocessor_config.json", "processor_config.json")):
        # DeepSeek-OCR normalizes with mean = std = 0.5 (common.deepseek_ocr.MEAN / STD)
        from common.deepseek_ocr import MEAN, STD  # noqa: PLC0415

        config = {"image_processor": {"image_mean": [MEAN] * 3, "image_std": [STD] * 3}}
        (folder / "processor_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return folder


def gguf_paths(cache: Path, checkpoint: Path) -> dict[str, Path]:
    """Where a snapshot's converted files go: one per text outtype, and "mmproj"."""
    folder = cache / "gguf" / _checkpoint_key(checkpoint)
    paths = {outtype: folder / f"text-{outtype}.gguf" for outtype in OUTTYPES}
    paths["mmproj"] = folder / f"mmproj-{MMPROJ_OUTTYPE}.gguf"
    return paths


def convert_command(python: Path, vendored: Path, staged: Path, outfile: Path, outtype: str,
                    mmproj: bool) -> list[str]:
    """The converter's command line for one GGUF file (`--mmproj` for the vision part)."""
    return [str(python), str(vendored / "convert_hf_to_gguf.py"), str(staged), "--outtype", outtype,
            "--outfile", str(outfile), *(["--mmproj"] if mmproj else [])]


def convert(cache: Path, vendored: Path, checkpoint: Path, model: str, outtypes: tuple[str, ...] = tuple(OUTTYPES)
            ) -> dict[str, Path]:
    """The GGUF files of `checkpoint`, each converted once (written under a temporary name, then renamed)."""
    paths = gguf_paths(cache, checkpoint)
    wanted = [*outtypes, "mmproj"]
    if all(paths[k].exists() for k in wanted):
        return {k: paths[k] for k in wanted}
    python = converter_python(cache)
    staged = stage_checkpoint(checkpoint, model, paths["mmproj"].parent / "snapshot")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendored / "gguf-py"), str(ROOT)])}
    for key in wanted:
        if paths[key].exists():
            continue
        tmp = paths[key].with_name(paths[key].name + f".tmp{os.getpid()}")
        mmproj = key == "mmproj"
        _log(f"converting {checkpoint.name} -> {paths[key].name} ...")
        _run(convert_command(python, vendored, staged, tmp, MMPROJ_OUTTYPE if mmproj else key, mmproj), env=env,
             log=paths[key].with_suffix(".log"))
        tmp.rename(paths[key])
    return {k: paths[k] for k in wanted}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as ten-byte varints
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int | float) -> bytes:
    """One protobuf field: bytes are length-delimited, ints varints, floats 32-bit."""
    if isinstance(payload, bytes):
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    if isinstance(payload, float):
        return _varint(number << 3 | 5) + struct.pack("<f", payload)
    return _varint(number << 3) + _varint(payload)


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), inverted: character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def sentencepiece_model(tokenizer: dict[str, Any]) -> bytes:
    """A SentencePiece model (serialized `ModelProto`) with the pieces of a byte-level BPE `tokenizer.json` at
    the same ids, for converters that read only `tokenizer.model`.

    Why: PaddleOCR-VL's real SentencePiece vocabulary is not available, our snapshots carry a byte-level BPE
    stand-in with the real special ids. Its 256 one-byte pieces become SentencePiece's byte pieces `<0xNN>`
    (byte fallback needs all of them), longer ones are turned back into text (U+2581 for a space, as
    SentencePiece writes it); added special tokens are CONTROL, `<unk>` UNKNOWN. Scores favour fewer, longer
    pieces. Only the token count and the special ids matter for a speed benchmark on random weights, not an
    exact segmentation of the text."""
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    unk = tokenizer["model"].get("unk_token") or "<unk>"
    decoder = _byte_level_decoder()
    by_id: dict[int, tuple[str, int]] = {}
    for piece, token_id in vocab.items():
        by_id[token_id] = (piece, 1)
    for piece, token_id in specials.items():
        by_id[token_id] = (piece, 3)
    size = max(by_id) + 1
    seen: set[str] = set()
    pieces = bytearray()
    for token_id in range(size):
        piece, kind = by_id.get(token_id, (f"<unused{token_id}>", 5))
        if piece == unk:
            kind = 2
        elif kind == 1 and len(piece) == 1 and piece in decoder:
            piece, kind = f"<0x{decoder[piece]:02X}>", 6
        elif kind == 1 and all(ch in decoder for ch in piece):
            try:
                piece = bytes(decoder[ch] for ch in piece).decode("utf-8").replace(" ", "\u2581")
            except UnicodeDecodeError:
                kind = 5
        if piece in seen or not piece:
            piece, kind = f"<unused{token_id}>", 5
        seen.add(piece)
        score = 0.0 if kind != 1 else -1.0 / max(len(piece), 1)
        pieces += _field(1, _field(1, piece.encode("utf-8")) + _field(2, float(score)) + _field(3, kind))
    unk_id = vocab.get(unk, specials.get(unk, 0))
    # TrainerSpec: model_type BPE (3), byte_fallback (35), unk/bos/eos/pad ids (40-43);
    # NormalizerSpec: identity, no dummy prefix, no extra-whitespace removal, spaces escaped
    trainer = _field(3, 2) + _field(35, 1) + _field(40, unk_id) + _field(41, -1) + _field(42, -1) + _field(43, -1)
    normalizer = _field(1, b"identity") + _field(3, 0) + _field(4, 0) + _field(5, 1)
    return bytes(pieces) + _field(2, trainer) + _field(3, normalizer)


# ------------------------------------------------------------------------------------------------- running
def prompt_for(model: str) -> str:
    """Our default prompt for `model`, with its image placeholder written as mtmd-cli's media marker."""
    from common.prompts import DEFAULT_PROMPTS, IMAGE_PLACEHOLDER  # noqa: PLC0415

    return DEFAULT_PROMPTS[model].replace(IMAGE_PLACEHOLDER, MEDIA_MARKER)


def run_command(binary: Path, text_gguf: Path, mmproj: Path, image: Path, prompt: str, model: str,
                max_new_tokens: int, threads: int = 2, warmup: bool = False, context: int = CONTEXT) -> list[str]:
    """mtmd-cli's command line: one page, greedy, exactly `max_new_tokens` (EOS ignored), timings logged."""
    return [str(binary), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
            "-n", str(max_new_tokens), "--ignore-eos", "--temp", "0", "-t", str(threads), "-tb", str(threads),
            "-c", str(context), *MODELS[model].template_args, "--perf", "-lv", "4",
            *([] if warmup else ["--no-warmup"])]


_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
#: A verbose log line's time since the log started: minutes.seconds.milliseconds.microseconds.
_STAMP = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ", re.MULTILINE)
#: The CLI encodes the image's chunks in batches: "encoding mtmd batch, n_chunks = K (done = D, total = T)",
#: then "mtmd batch encoding done in N ms" (D: the chunks evaluated before this batch).
_BATCH = re.compile(rf"encoding mtmd batch, n_chunks = (\d+) \(done = (\d+), total = \d+\)"
                    rf"(?:.*\n)*?.*?mtmd batch encoding done in {_NUMBER} ms")
_EMBED = re.compile(rf"(?:image|audio) decoded \(batch \d+/\d+\) in {_NUMBER} ms")
_PROMPT = re.compile(rf"llama_perf_context_print:\s+prompt eval time =\s*{_NUMBER} ms /\s*(\d+) tokens")
_EVAL = re.compile(rf"llama_perf_context_print:\s+eval time =\s*{_NUMBER} ms /\s*(\d+) runs")


def _stamp_ms(line_start: re.Match[str]) -> float:
    minutes, seconds, millis, micros = (int(g) for g in line_start.groups())
    return (minutes * 60 + seconds) * 1000.0 + millis + micros / 1000.0


def parse_log(text: str) -> dict[str, Any]:
    """Its timings from a `--perf -lv 4` log (this pinned version's wording): vision ms (the encode of the
    image's chunks, `image_slices` of them), the image embeddings' decode ms, prompt eval ms and tokens, eval
    (decode) ms and runs, load ms. Missing figures are None.

    Why `prefill_ms` is not its prompt eval: that clock starts at a prompt batch's decode and stops only when the
    context next synchronizes, at the next decode, so an encode that runs between two prompt decodes (an image
    after some prompt text, or a second encode batch after the first image's embeddings) is counted in it. Those
    encodes are the batches with chunks done before them; `prefill_ms` is prompt eval less them. And why load
    is read from the log's clock: its own "load time" stops at the first eval, after the first encode; here it is
    the time until the first encode starts (both models and the projector loaded, warm-up done if asked)."""
    batches = [(int(m.group(1)), int(m.group(2)), float(m.group(3))) for m in _BATCH.finditer(text)]
    embeds = [float(m.group(1)) for m in _EMBED.finditer(text)]
    prompt, decode = _PROMPT.search(text), _EVAL.search(text)
    prompt_ms = float(prompt.group(1)) if prompt else None
    inside = sum(ms for _, done, ms in batches if done > 0)
    load_ms = None
    first = text.find("encoding mtmd batch")
    if first >= 0:
        stamps = [m for m in _STAMP.finditer(text, 0, first + 1)]
        load_ms = _stamp_ms(stamps[-1]) if stamps else None
    return {"vision_ms": sum(ms for *_, ms in batches) if batches else None,
            "image_slices": sum(n for n, _, _ in batches), "image_decode_ms": sum(embeds) if embeds else None,
            "prompt_eval_ms": prompt_ms, "prefill_ms": prompt_ms - inside if prompt_ms is not None else None,
            "prompt_tokens": int(prompt.group(2)) if prompt else None,
            "decode_ms": float(decode.group(1)) if decode else None,
            "decode_runs": int(decode.group(2)) if decode else None, "load_ms": load_ms}


def derive(parsed: dict[str, Any]) -> dict[str, Any]:
    """Rates from parsed timings: prefill tok/s over the prompt tokens, decode tok/s over the runs."""
    def rate(count: int | None, ms: float | None) -> float | None:
        return count / (ms / 1000.0) if count and ms else None

    return {"prefill_tok_s": rate(parsed["prompt_tokens"], parsed["prefill_ms"]),
            "decode_tok_s": rate(parsed["decode_runs"], parsed["decode_ms"])}


def execute(command: list[str], timeout_s: float, log: Path | None = None) -> tuple[int, str, int, float]:
    """Run the CLI: (exit status, its output, peak RSS in bytes, wall seconds). Peak RSS is the child's own
    high-water mark from `wait4`, the figure `/usr/bin/time -v` reports, without needing that tool."""
    started = time.perf_counter()
    with open(log or os.devnull, "w+b") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        sink.seek(0)
        output = sink.read().decode("utf-8", errors="replace") if log else ""
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return process.returncode, output, int(peak), time.perf_counter() - started


def measure(model: str, checkpoint: Path, image: Path, max_new_tokens: int, outtype: str, *, threads: int = 2,
            warmup: bool = False, timeout_s: float = 3600.0, cache: Path | None = None) -> dict[str, Any]:
    """One llama.cpp run of `model` at text type `outtype` (sources, build and conversion made when missing):
    the parsed figures, peak RSS and the command, or {"error": why}."""
    if model not in MODELS:
        return {"error": f"skipped: {model} is not wired for llama.cpp (wired: {', '.join(MODELS)})"}
    cache = cache or cache_dir()
    try:
        vendored = fetch_sources(cache)
        binary = build(cache, vendored)
        files = convert(cache, vendored, checkpoint, model, (outtype,))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"error": f"llama.cpp not prepared: {exc}".splitlines()[0][:300]}
    command = run_command(binary, files[outtype], files["mmproj"], image, prompt_for(model), model, max_new_tokens,
                          threads, warmup)
    log = files[outtype].with_name(f"run-{outtype}-{max_new_tokens}.log")
    _log(f"running {model} {OUTTYPES[outtype]} ...")
    code, output, peak, wall = execute(command, timeout_s, log)
    if code != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        return {"error": f"{BINARY} exit {code}: {tail}"[:400], "command": command}
    parsed = parse_log(output)
    if parsed["decode_runs"] is None or parsed["prompt_tokens"] is None:
        return {"error": f"no timings in its log ({log})", "command": command}
    return {**parsed, **derive(parsed), "peak_rss_bytes": peak, "wall_s": wall, "outtype": outtype,
            "name": f"llama.cpp {OUTTYPES[outtype]}", "version": VERSION, "threads": threads,
            "text_gguf_bytes": files[outtype].stat().st_size, "mmproj_bytes": files["mmproj"].stat().st_size,
            "command": command, "log": str(log)}


# ------------------------------------------------------------------------------------------------- main
def _ms(value: float | None, unit: str = " ms", digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--checkpoint", type=Path, required=True, help="snapshot folder (never written to)")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "page.png")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--outtype", default=",".join(OUTTYPES), help="comma list of " + ", ".join(OUTTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", action="store_true", help="let it warm up before the measured run")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--prepare-only", action="store_true", help="fetch, build and convert, run nothing")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    args = parser.parse_args(argv)
    outtypes = [t.strip() for t in args.outtype.split(",") if t.strip()]
    if not outtypes or any(t not in OUTTYPES for t in outtypes):
        parser.error(f"--outtype {args.outtype!r}: choose from {', '.join(OUTTYPES)}")
    if args.prepare_only:
        cache = cache_dir()
        vendored = fetch_sources(cache)
        print(build(cache, vendored))
        for path in convert(cache, vendored, args.checkpoint, args.model, tuple(outtypes)).values():
            print(path)
        return 0
    records = []
    for outtype in outtypes:
        record = measure(args.model, args.checkpoint, args.image, args.max_new_tokens, outtype, threads=args.threads,
                         warmup=args.warmup, timeout_s=args.timeout)
        records.append(record)
        if "error" in record:
            print(f"{args.model} {OUTTYPES[outtype]}: {record['error']}")
            continue
        print(f"{args.model} {OUTTYPES[outtype]}: load {_ms(record['load_ms'])}, vision {_ms(record['vision_ms'])} "
              f"({record['image_slices']} chunks), prefill {_ms(record['prefill_ms'])} / {record['prompt_tokens']} "
              f"tokens ({_ms(record['prefill_tok_s'], ' tok/s')}), decode {_ms(record['decode_tok_s'], ' tok/s', 2)} "
              f"({record['decode_runs']} runs), peak RSS {record['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
