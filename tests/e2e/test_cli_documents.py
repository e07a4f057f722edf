"""`deepseek-ocr-cli` on documents, as a user runs it: folders, globs, PDFs, TIFFs, output folders, resume.

A subprocess on the tiny DeepSeek-OCR checkpoint per run (its own config.toml, HOME and XDG folders, hub off).
Inputs are generated here: images in several formats, a corrupt file, a 3-page PDF, a 3-frame TIFF, an empty
and a password-protected PDF (made by the PDF unit tests' writer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.unit.test_pdf import make_pdf

CLI = Path(sys.executable).parent / "deepseek-ocr-cli"
FAST = ["--mode", "tiny", "--device", "cpu", "--backend", "torch", "--max-new-tokens", "2"]

pytestmark = pytest.mark.skipif(not CLI.exists(), reason="console script not installed (pip install -e .)")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DEEPSEEK_OCR", "HF_", "TQDM_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    (tmp_path / "config.toml").touch()  # `--config` must name an existing file
    return env


@pytest.fixture()
def run(tmp_path: Path, deepseek_tiny: Path):
    def _run(*args: str, model: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--model-dir", str(deepseek_tiny), *FAST] if model else []
        return subprocess.run([str(CLI), *args, "--config", str(tmp_path / "config.toml"), *extra],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=300, cwd=tmp_path)

    return _run


def _image(path: Path, size: tuple[int, int] = (96, 64), **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (250, 250, 250)).save(path, **save)
    return path


def _tiff(path: Path) -> Path:
    frames = [Image.new("RGB", (64 + 8 * i, 48), (255, 255 - 50 * i, 255)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def _lines(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow  # model runs in subprocesses: 6-30 s each on two cores
def test_folder_of_mixed_formats_one_answer_per_page_corrupt_page_reported(run, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    _image(scans / "a.png")
    _image(scans / "b.jpg")
    _image(scans / "c.webp")
    _image(scans / "d.bmp")
    (scans / "e-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _tiff(scans / "f.tif")
    (scans / "g.pdf").write_bytes(make_pdf([(72, 72), (72, 100), (100, 72)], black_box=False))
    (scans / "notes.txt").write_text("not a page")
    proc = run("scans", "--format", "jsonl", "--output-dir", "out")
    assert proc.returncode == 2, proc.stderr
    pages = _lines(proc)
    assert pages, proc.stderr
    # In input order (sorted names), every page its own line, the corrupt one as its error, in its place.
    assert [(Path(p["input"]).name, p["page"]) for p in pages] == [
        ("a.png", 1), ("b.jpg", 1), ("c.webp", 1), ("d.bmp", 1), ("e-corrupt.png", 1),
        ("f.tif", 1), ("f.tif", 2), ("f.tif", 3), ("g.pdf", 1), ("g.pdf", 2), ("g.pdf", 3)]
    assert "error" in pages[4] and all("error" not in p for p in pages[:4] + pages[5:])
    assert [p["width"] for p in pages[5:8]] == [64, 72, 80]  # every TIFF frame is a page
    assert all(p["finish_reason"] == "length" and isinstance(p["blocks"], list) for p in pages if "text" in p)
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: 1 of 11 page(s) failed: ") and "e-corrupt.png" in err[-1]
    assert "1 file(s)" in proc.stderr and "pages/min" in proc.stderr
    assert "flagged 10 page(s)" in proc.stderr and "g.pdf page 3 (length)" in proc.stderr
    pdf = json.loads((tmp_path / "out" / "g" / "result.json").read_text())
    assert [p["page"] for p in pdf["pages"]] == [1, 2, 3] and pdf["complete"]
    assert [f["page"] for f in pdf["flagged"]] == [1, 2, 3]
    for stem in ("page-0001.txt", "page-0001.md", "page-0001.json", "page-0001.annotated.jpg"):
        assert (tmp_path / "out" / "g" / stem).is_file()
    bad = json.loads((tmp_path / "out" / "e-corrupt" / "result.json").read_text())
    assert bad["failed"][0]["page"] == 1 and not bad["complete"]


@pytest.mark.slow  # model runs in subprocesses: 6-30 s each on two cores
def test_shell_glob_each_file_its_own_answer_and_the_two_forms_kept_apart(run, tmp_path: Path) -> None:
    names = [str(_image(tmp_path / f"p{i}.png", (80 + 8 * i, 60))) for i in (1, 2, 3)]  # what `p*.png` gives
    proc = run(*names, "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("<!--")] == [
        f"<!-- {name} -->" for name in names]
    assert "3 page(s) of 3" in proc.stderr
    glued = run("--image", *names)  # `--image p*.png`: only the first file is the option's value
    assert glued.returncode == 2 and "drop --image" in glued.stderr and len(glued.stderr.splitlines()) == 1
    several = run("--image", names[0], "--image", names[1])
    assert several.returncode == 2 and "ONE prompt" in several.stderr


@pytest.mark.slow  # model runs in subprocesses: 6-30 s each on two cores
def test_empty_and_password_protected_pdfs_are_reported_the_rest_goes_on(run, tmp_path: Path) -> None:
    _image(tmp_path / "good.png")
    (tmp_path / "empty.pdf").write_bytes(b"")
    (tmp_path / "locked.pdf").write_bytes(make_pdf([(72, 72)], password="secret"))
    proc = run("good.png", "empty.pdf", "locked.pdf", "--format", "json")
    assert proc.returncode == 2, proc.stderr
    data = json.loads(proc.stdout)
    assert [len(d["pages"]) for d in data["documents"]] == [1]
    assert {f["input"] for f in data["failed"]} == {"empty.pdf", "locked.pdf"}
    assert "password-protected" in proc.stderr
    alone = run("locked.pdf")
    assert alone.returncode == 2 and len(alone.stderr.strip().splitlines()) == 1
    assert "locked.pdf is password-protected" in alone.stderr


@pytest.mark.slow  # model runs in subprocesses: 6-30 s each on two cores
def test_interrupted_run_keeps_finished_pages_then_resume_finishes(tmp_path: Path, deepseek_tiny: Path) -> None:
    (tmp_path / "doc.pdf").write_bytes(make_pdf([(72, 72)] * 3, black_box=False))
    slow = ["--mode", "tiny", "--device", "cpu", "--backend", "torch", "--max-new-tokens", "60", "--ignore-eos"]
    args = [str(CLI), "--config", str(tmp_path / "config.toml"), "--model-dir", str(deepseek_tiny), "doc.pdf",
            *slow, "--output-dir", "out", "--batch-size", "1"]
    # A shell that runs the suite in the background starts it with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen([*args, "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(tmp_path), cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = tmp_path / "out" / "doc" / "page-0001.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    data = json.loads(out)  # json mode still prints the object, with the finished pages
    assert data["interrupted"] is True and 1 <= len(data["pages"]) < 3
    finished = len(data["pages"])
    again = subprocess.run(args, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "already holds results" in again.stderr  # no flag: nothing overwritten
    resumed = subprocess.run([*args, "--resume", "--format", "jsonl"], capture_output=True, text=True,
                             env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [p["page"] for p in _lines(resumed)] == [1, 2, 3]
    assert f"{finished} page(s) finished by an earlier run" in resumed.stderr
    summary = json.loads((tmp_path / "out" / "doc" / "result.json").read_text())
    assert summary["complete"] and [p["page"] for p in summary["pages"]] == [1, 2, 3]


@pytest.mark.slow  # model runs in subprocesses: 6-30 s each on two cores
def test_overwrite_refusal_then_overwrite_and_changed_settings_rerun(run, tmp_path: Path) -> None:
    _image(tmp_path / "page.png")
    assert run("page.png", "--output-dir", "out").returncode == 0
    before = (tmp_path / "out" / "page" / "page-0001.json").read_text()
    refused = run("page.png", "--output-dir", "out")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "out" / "page" / "page-0001.json").read_text() == before
    same = run("page.png", "--output-dir", "out", "--resume", "--format", "jsonl")
    assert "finished by an earlier run" in same.stderr
    changed = run("page.png", "--output-dir", "out", "--resume", "--prompt", r"<image>\nFree OCR.")
    assert changed.returncode == 0 and "finished by an earlier run" not in changed.stderr
    assert run("page.png", "--output-dir", "out", "--overwrite").returncode == 0


def test_render_post_processes_text_made_elsewhere_without_a_model(run, tmp_path: Path) -> None:
    _image(tmp_path / "page.png", (200, 100))
    (tmp_path / "raw.txt").write_text("<|ref|>title<|/ref|><|det|>[[0, 0, 499, 99]]<|/det|>\n# Title\n"
                                      "<|ref|>image<|/ref|><|det|>[[0, 500, 999, 999]]<|/det|>\n<|ref|>text")
    proc = run("render", "raw.txt", "--image", "page.png", "--output-dir", "out", "--format", "json", model=False)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["blocks"][0] == {"label": "title", "text": "# Title", "box": [0, 0, 99, 9]}
    assert "![](images/page-0001-0.jpg)" in record["markdown"] and "text" in record["markdown"]
    assert Image.open(tmp_path / "out" / "page" / "images" / "page-0001-0.jpg").size == (200, 50)
    assert (tmp_path / "out" / "page" / "page-0001.annotated.jpg").is_file()
    again = run("render", "raw.txt", "--image", "page.png", "--output-dir", "out", model=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
