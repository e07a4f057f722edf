"""The installed `deepseek-ocr-cli` as a user runs it: a subprocess on the tiny checkpoints.

Each run gets its own config.toml, HOME and XDG folders under tmp_path, so nothing touches the real user's
settings or cache, and hub access is switched off (every model comes from `--model-dir`).
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

CLI = Path(sys.executable).parent / "deepseek-ocr-cli"
STAGES = ("vision.prepare_inputs", "vision.compute_embeddings", "prompt.render", "prompt.build_tokens",
          "decode.prefill", "decode.iterative", "decode.generate")
# 512 px views (the "tiny" preset) keep the SAM encoder cheap on a shared CPU.
FAST = ["--mode", "tiny", "--device", "cpu", "--backend", "torch"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CLI.exists(), reason="console script not installed (pip install -e .)")]


@pytest.fixture()
def run(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEEPSEEK_OCR", "HF_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    config = tmp_path / "config.toml"
    config.touch()  # --config must name an existing file; tests may write it

    def _run(*args: str, debug: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        extra = {"DEEPSEEK_OCR_DEBUG": "1"} if debug else {}
        return subprocess.run([str(CLI), "--config", str(config), *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=timeout)

    return _run


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "page.png"
    image = Image.new("RGB", (160, 120), (255, 255, 255))
    for x in range(20, 140):
        image.putpixel((x, 60), (0, 0, 0))
    image.save(path)
    return path


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------ answers
def test_json_answer_fields(run, deepseek_tiny: Path, page: Path) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--image", str(page), "--format", "json",
               "--max-new-tokens", "5", *FAST)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "model", "backend",
            "device", "dtype", "timings_ms"} <= set(data)
    assert (data["model"], data["backend"], data["device"], data["dtype"]) == ("deepseek-ocr", "torch", "cpu",
                                                                               "float32")
    assert data["finish_reason"] in ("stop", "length") and 1 <= data["completion_tokens"] <= 5
    assert len(data["token_ids"]) == data["completion_tokens"] - (data["finish_reason"] == "stop")
    assert 1 not in data["token_ids"] or data["finish_reason"] == "length"   # eos excluded
    # BOS + 73 image tokens ("tiny": 512 px, no crop) + the default prompt's text.
    assert data["prompt_tokens"] > 74
    assert set(STAGES) <= set(data["timings_ms"]) and data["timings_ms"]["decode.prefill"] > 0
    assert "logprobs" not in data


def test_text_mode_streams_the_same_answer(run, deepseek_tiny: Path, page: Path) -> None:
    args = ("--model-dir", str(deepseek_tiny), "--image", str(page), "--prompt", r"<image>\nFree OCR.",
            "--max-new-tokens", "6", "--ignore-eos", *FAST)
    as_json = run(*args, "--format", "json")
    as_text = run(*args)
    assert as_json.returncode == 0 and as_text.returncode == 0, as_text.stderr
    text = json.loads(as_json.stdout)["text"]
    assert as_text.stdout == (text if text.endswith("\n") else text + "\n")
    assert "6 generated tokens" in as_text.stderr and "finish: length" in as_text.stderr


def test_logprobs_are_raw_and_one_per_token(run, deepseek_tiny: Path) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--prompt", "Hello", "--format", "json", "--logprobs", "3",
               "--max-new-tokens", "4", "--ignore-eos", *FAST)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["logprobs"]) == data["completion_tokens"] == 4
    for entry, token_id in zip(data["logprobs"], data["token_ids"]):
        assert entry["token_id"] == token_id and len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        # Greedy with no ban triggered in 4 tokens: the chosen id is the raw argmax.
        assert entry["top_logprobs"][0]["token_id"] == token_id
        assert entry["logprob"] == pytest.approx(tops[0])


def test_bench_prints_stage_table_and_rates(run, deepseek_tiny: Path) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--prompt", "Hello", "--bench", "--ignore-eos",
               "--max-new-tokens", "4", *FAST)
    assert proc.returncode == 0, proc.stderr
    for stage in STAGES:
        assert stage in proc.stderr
    assert "decode:" in proc.stderr and "tokens/s (3 steps)" in proc.stderr
    assert "avg ms" in proc.stderr


def test_paddle_task_text_only_and_underscore_flags(run, paddle_tiny: Path, page: Path) -> None:
    common = ("--model", "paddleocr-vl", "--model-dir", str(paddle_tiny), "--format", "json", "--device", "cpu",
              "--backend", "torch", "--max_new_tokens", "3")
    task = run(*common, "--image", str(page), "--task", "table", "--use-cache", "false")
    text_only = run(*common, "--prompt", "Hello")
    assert task.returncode == 0, task.stderr
    assert text_only.returncode == 0, text_only.stderr
    assert json.loads(task.stdout)["model"] == "paddleocr-vl"
    assert json.loads(task.stdout)["prompt_tokens"] > json.loads(text_only.stdout)["prompt_tokens"]


def test_clean_output_strips_grounding(run, deepseek_tiny: Path, page: Path) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--image", str(page), "--format", "json", "--clean",
               "--max-new-tokens", "3", *FAST)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "<|ref|>" not in data["markdown"] and isinstance(data["grounding"], list)


@pytest.fixture()
def image_server(page: Path) -> Iterator[str]:
    body = page.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/page.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_image_url_is_fetched(run, deepseek_tiny: Path, page: Path, image_server: str) -> None:
    args = ("--model-dir", str(deepseek_tiny), "--format", "json", "--max-new-tokens", "3", *FAST)
    from_url = run(*args, "--image", f"{image_server}/page.png")
    from_file = run(*args, "--image", str(page))
    assert from_url.returncode == 0, from_url.stderr
    assert json.loads(from_url.stdout)["token_ids"] == json.loads(from_file.stdout)["token_ids"]
    missing = run(*args, "--image", f"{image_server}/nothing.png")
    assert missing.returncode == 2 and "HTTP 404" in _error_line(missing)


def test_help_teaches(run) -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for words in ("Examples:", "--image", "--prompt-file", "--logprobs", "--repetition-guard", "--task", "<image>"):
        assert words in proc.stdout


# ------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("args, needle", [
    (("--image", "missing.png"), "not found"),
    (("--prompt", "Free OCR.", "--image", "{page}"), "0 <image> placeholder"),
    (("--prompt", r"<image>\n<image>\nx", "--image", "{page}"), "2 <image> placeholder"),
    (("--image", "{page}", "--max-new-tokens", "lots"), "--max-new-tokens"),
    (("--image", "{page}", "--crop-mode", "maybe"), "--crop-mode"),
    (("--image", "{page}", "--format", "xml"), "--format"),
    (("--image", "{page}", "--dtype", "int3"), "--dtype"),
    (("--image", "{page}", "--frobnicate", "1"), "unknown option --frobnicate"),
    (("page.png",), "page.png not found"),  # a bare word is a document to read
    (("{page}", "--image", "{page}"), "or --image (one prompt over all its images), not both"),
    (("--image", "{page}", "--image", "{page}"), "go into ONE prompt"),
    (("--prompt", "x", "--logprobs", "2"), "--format json"),
    (("--image", "{page}", "--task", "table"), "PaddleOCR-VL"),
    (("--image", "{page}", "--base-size", "640"), "give --mode or --base-size, not both"),  # FAST has --mode
    ((), "nothing to do"),
])
def test_user_mistakes_exit_2_with_one_line(run, deepseek_tiny: Path, page: Path, args: tuple, needle: str) -> None:
    proc = run("--model-dir", str(deepseek_tiny), *(a.replace("{page}", str(page)) for a in args), *FAST)
    assert proc.returncode == 2, proc.stderr
    assert needle in _error_line(proc)
    assert proc.stdout == ""


def test_unreadable_image_and_prompt_file(run, deepseek_tiny: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    proc = run("--model-dir", str(deepseek_tiny), "--image", str(fake), *FAST)
    assert proc.returncode == 2 and "not in a supported image format" in _error_line(proc)
    proc = run("--model-dir", str(deepseek_tiny), "--prompt-file", str(tmp_path / "none.txt"), *FAST)
    assert proc.returncode == 2 and "--prompt-file" in _error_line(proc)


def test_missing_model_files_exit_2(run, tmp_path: Path, page: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    proc = run("--model-dir", str(empty), "--image", str(page), *FAST)
    assert proc.returncode == 2, proc.stderr
    _error_line(proc)


def test_bad_config_file_exit_2(run, tmp_path: Path, page: Path) -> None:
    (tmp_path / "config.toml").write_text("[inference]\nmax_new_tokens = 'many'\n")
    proc = run("--image", str(page))
    assert proc.returncode == 2 and "max_new_tokens" in _error_line(proc)


def test_truncated_weights_exit_2(run, deepseek_tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated-model"
    shutil.copytree(deepseek_tiny, broken)
    weights = broken / "model-00001-of-000001.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    proc = run("--model-dir", str(broken), "--prompt", "Hello", *FAST)
    assert proc.returncode == 2 and "safetensors" in _error_line(proc)


def test_internal_failure_exit_1_and_debug_traceback(run, deepseek_tiny: Path, tmp_path: Path) -> None:
    # A config that disagrees with its own weights is a broken snapshot, not a typo: an internal error.
    broken = tmp_path / "mismatched-model"
    shutil.copytree(deepseek_tiny, broken)
    config = json.loads((broken / "config.json").read_text())
    for section in (config, config["language_config"]):
        section["vocab_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    proc = run("--model-dir", str(broken), "--prompt", "Hello", *FAST)
    assert proc.returncode == 1, proc.stderr
    line = _error_line(proc)
    assert "internal error" in line and "DEEPSEEK_OCR_DEBUG=1" in line and "Traceback" not in proc.stderr
    debug = run("--model-dir", str(broken), "--prompt", "Hello", *FAST, debug=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_individual_model_file_flags(run, deepseek_tiny: Path) -> None:
    proc = run("--model-config", str(deepseek_tiny / "config.json"), "--tokenizer",
               str(deepseek_tiny / "tokenizer.json"), "--weights",
               str(deepseek_tiny / "model-00001-of-000001.safetensors"), "--prompt", "Hello", "--format", "json",
               "--max-new-tokens", "2", "--ignore-eos", *FAST)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["completion_tokens"] == 2 and data["prompt_tokens"] == 2  # BOS + "Hello"
