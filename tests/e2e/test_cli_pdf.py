"""`deepseek-ocr-cli` with PDF input, as a user runs it: a subprocess on the tiny DeepSeek-OCR checkpoint.

The PDFs are made in the test with pypdfium2 (blank pages of known sizes); each run gets its own config.toml,
HOME and XDG folders under tmp_path, and hub access is off (the model comes from `--model-dir`).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).parent / "deepseek-ocr-cli"
FAST = ["--mode", "tiny", "--device", "cpu", "--backend", "torch", "--max-new-tokens", "2"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CLI.exists(), reason="console script not installed (pip install -e .)")]


@pytest.fixture()
def run(tmp_path: Path):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DEEPSEEK_OCR", "HF_", "TQDM_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    config = tmp_path / "config.toml"
    config.touch()  # --config must name an existing file; tests may write it

    def _run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLI), "--config", str(config), *args], capture_output=True, text=True,
                              env={**env, **(extra_env or {})}, timeout=300)

    return _run


@pytest.fixture(scope="module")
def two_pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument.new()
    doc.new_page(120, 90)
    doc.new_page(90, 120)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    path = tmp_path_factory.mktemp("pdf") / "two.pdf"
    path.write_bytes(buffer.getvalue())
    return path


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_text_mode_pages_in_order_with_separators(run, deepseek_tiny: Path, two_pages: Path) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--pdf", str(two_pages), "--ignore-eos", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^<!-- page (\d+) -->$", proc.stdout, flags=re.M) == ["1", "2"]
    assert proc.stdout.startswith("<!-- page 1 -->\n\n")
    assert "\n\n<!-- page 2 -->\n\n" in proc.stdout
    # The bar on stderr (stdout is a pipe here) and the summary: 2 pages, 2 tokens each.
    assert "2/2" in proc.stderr and "page" in proc.stderr
    assert re.search(r"2 page\(s\) of 2: \d+ prompt \+ 4 generated tokens, finish: 2 length", proc.stderr)


def test_json_mode_and_page_selection_via_image(run, deepseek_tiny: Path, two_pages: Path,
                                                tmp_path: Path) -> None:
    # No .pdf name: the content says PDF. TQDM_DISABLE silences the bar.
    unnamed = tmp_path / "scan"
    unnamed.write_bytes(two_pages.read_bytes())
    proc = run("--model-dir", str(deepseek_tiny), "--image", str(unnamed), "--pages", "2", "--dpi", "100",
               "--format", "json", *FAST, extra_env={"TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    assert data["page_count"] == 2 and [p["page"] for p in data["pages"]] == [2]
    (page,) = data["pages"]
    assert {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "timings_ms"} <= set(page)
    assert 1 <= page["completion_tokens"] <= 2 and page["model"] == "deepseek-ocr"


@pytest.mark.parametrize("args, words", [
    (["--pages", "3"], "page 3 is out of range: the PDF has 2 pages"),
    (["--pages", "2-1"], "runs backwards"),
    (["--dpi", "5"], "--dpi: '5' is not allowed (allowed: an integer from 18 to 1200)"),
    (["--prompt", "<image><image>\\nTwo pages?"], "the prompt takes one <image>"),
])
def test_pdf_mistakes_are_one_line(run, deepseek_tiny: Path, two_pages: Path, args: list[str],
                                   words: str) -> None:
    proc = run("--model-dir", str(deepseek_tiny), "--pdf", str(two_pages), *args, *FAST)
    assert words in _error_line(proc)


def test_input_mistakes_are_one_line(run, deepseek_tiny: Path, two_pages: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.pdf"
    corrupt.write_bytes(b"%PDF-1.7\nthis is not really a PDF")
    cases = [
        (["--pdf", str(corrupt)], "is not a readable PDF (corrupt, truncated or not a PDF)"),
        (["--image", str(two_pages), "--image", str(two_pages)], "is a PDF: give it alone"),
        (["--pdf", str(two_pages), "--image", str(two_pages)], "give --pdf or --image, not both"),
        (["--pages", "1"], "--pages and --dpi are PDF options"),
    ]
    for args, words in cases:
        proc = run("--model-dir", str(deepseek_tiny), *args, *FAST)
        assert words in _error_line(proc), args
