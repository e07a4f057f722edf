"""The Python API (common/api.py) on the tiny checkpoints with the real PyTorch backend.

Greedy decoding is deterministic, so "the same answer" is checked as the same token ids: every input form of one
image, the default prompt against the official prompt written out, a PDF page against its rendered image. Each
test gets its own config.toml, HOME and XDG folders, so the user's settings and cache are never read.
"""
from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from common.api import OCR
from common.errors import ImageError, UnknownModelError, UserError
from common.pdf import iter_pages
from common.pipeline import Pipeline, Request, Result

# 512 px views without tiles ("tiny") keep the SAM encoder cheap on a shared CPU.
FAST = {"backend": "torch", "device": "cpu", "dtype": "float32"}
OFFICIAL_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.touch()  # `config=` must name an existing file
    return path


@pytest.fixture(scope="module")
def page() -> Image.Image:
    image = Image.new("RGB", (160, 120), (255, 255, 255))
    for x in range(20, 140):
        image.putpixel((x, 60), (0, 0, 0))
    return image


@pytest.fixture()
def page_file(tmp_path: Path, page: Image.Image) -> Path:
    path = tmp_path / "page.png"
    page.save(path)
    return path


@pytest.fixture()
def deepseek(deepseek_tiny: Path, config: Path) -> OCR:
    return OCR("deepseek-ocr", model_dir=deepseek_tiny, config=config, mode="tiny", max_new_tokens=4, **FAST)


def _two_page_pdf() -> bytes:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument.new()
    doc.new_page(80, 60)
    doc.new_page(60, 90)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ answers
@pytest.mark.slow
def test_one_image_gives_a_result_with_timings(deepseek: OCR, page_file: Path, deepseek_tiny: Path) -> None:
    result = deepseek(page_file)
    assert isinstance(result, Result) and deepseek.last_result is result
    assert (result.model, result.backend, result.device, result.dtype) == ("deepseek-ocr", "torch", "cpu",
                                                                           "float32")
    assert 1 <= result.completion_tokens <= 4 and result.finish_reason in ("stop", "length")
    assert result.timings_ms["decode.prefill"] > 0 and result.timings_ms["vision.prepare_inputs"] > 0
    # The default prompt is the official one: the pipeline given that prompt written out answers the same.
    direct = deepseek.pipeline.run(Request(OFFICIAL_PROMPT, [Image.open(page_file).convert("RGB")],
                                           overrides={"mode": "tiny", "max_new_tokens": 4}))
    assert (result.token_ids, result.prompt_tokens) == (direct.token_ids, direct.prompt_tokens)


@pytest.mark.slow
def test_every_input_form_reads_the_same_image(deepseek: OCR, page: Image.Image, page_file: Path) -> None:
    expected = deepseek(str(page_file)).token_ids
    data = page_file.read_bytes()
    for source in (page_file, data, io.BytesIO(data), page, page.convert("RGBA")):
        assert deepseek(source).token_ids == expected, type(source)


@pytest.mark.slow
def test_url_input(deepseek: OCR, page_file: Path) -> None:
    body = page_file.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/page.png"
        assert deepseek(url).token_ids == deepseek(page_file).token_ids
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_stream_pieces_make_the_text(deepseek: OCR, page_file: Path) -> None:
    pieces = deepseek.stream(page_file, prompt="<image>\nFree OCR.", max_new_tokens=3, ignore_eos=True)
    assert not isinstance(pieces, list)
    text = "".join(pieces)
    result = deepseek.last_result
    assert result is not None and result.text == text
    assert (result.completion_tokens, result.finish_reason) == (3, "length")


@pytest.mark.slow
def test_two_images_with_placeholders(deepseek: OCR, page: Image.Image) -> None:
    result = deepseek([page, page], prompt="<image> <image>\nCompare.")
    single = deepseek([page], prompt="<image>\nCompare.")
    # Each 512 px view is 73 image tokens (RULES.md 5); one more view and one space more.
    assert result.prompt_tokens - single.prompt_tokens == 73 + 1


@pytest.mark.slow
def test_pdf_pages_one_result_each(deepseek: OCR, tmp_path: Path) -> None:
    data = _two_page_pdf()
    path = tmp_path / "doc.pdf"
    path.write_bytes(data)
    results = deepseek.pdf(path, ignore_eos=True, max_new_tokens=2)
    assert len(results) == 2 and all(r.completion_tokens == 2 for r in results)
    (second,) = deepseek.pdf(data, pages="2", ignore_eos=True, max_new_tokens=2)
    assert second.token_ids == results[1].token_ids
    with iter_pages(data, "2") as reader:
        (_, image), = reader
    assert deepseek(image, ignore_eos=True, max_new_tokens=2).token_ids == second.token_ids
    numbers = [number for number, _ in deepseek.iter_pdf(io.BytesIO(data), pages="2,1", max_new_tokens=1)]
    assert numbers == [2, 1]


@pytest.mark.slow
def test_settings_precedence(deepseek_tiny: Path, config: Path, page: Image.Image) -> None:
    config.write_text("[inference]\nmax_new_tokens = 3\nmode = \"tiny\"\n", encoding="utf-8")
    from_file = OCR(model_dir=deepseek_tiny, config=config, **FAST)
    assert from_file.model == "deepseek-ocr"
    assert from_file(page, ignore_eos=True).completion_tokens == 3          # config.toml over the default 512
    argument = OCR(model_dir=deepseek_tiny, config=config, max_new_tokens=2, **FAST)
    assert argument(page, ignore_eos=True).completion_tokens == 2           # argument over config.toml
    assert argument(page, ignore_eos=True, max_new_tokens=1).completion_tokens == 1   # call over both


@pytest.mark.slow
def test_paddle_default_prompt(paddle_tiny: Path, config: Path, page: Image.Image) -> None:
    ocr = OCR("paddleocr-vl", model_dir=paddle_tiny, config=config, max_new_tokens=4, **FAST)
    result = ocr(page)
    direct = Pipeline(ocr.settings, max_resident=1).run(Request("OCR:", [page], overrides={"max_new_tokens": 4}))
    assert result.model == "paddleocr-vl" and result.token_ids == direct.token_ids
    assert ocr(page, task="table").prompt_tokens != result.prompt_tokens   # the task replaces "OCR:"


# ------------------------------------------------------------------------------------------ mistakes
@pytest.fixture()
def unloaded(deepseek_tiny: Path, config: Path) -> OCR:
    return OCR(model_dir=deepseek_tiny, config=config, load=False, **FAST)


@pytest.mark.parametrize("call, words", [
    (lambda o, p: o(p, prompt="<image> <image>\nTwo?"), "2 <image> placeholder"),
    (lambda o, p: o(p, prompt="Free OCR."), "0 <image> placeholder"),
    (lambda o, p: o(), "nothing to do"),
    (lambda o, p: o(p, temperature=-1), "temperature: -1 is not allowed"),
    (lambda o, p: o(p, max_new_tokens="8"), "max_new_tokens: '8' is not allowed"),
    (lambda o, p: o(p, max_tokens=8), "unknown option 'max_tokens'"),
    (lambda o, p: o(p, task="table"), "task is a PaddleOCR-VL option"),
    (lambda o, p: o(42), "an image must be a path, URL, bytes, binary stream or PIL image, not int"),
    (lambda o, p: o(p, prompt=b"<image>"), "prompt must be a string"),
    (lambda o, p: o.pdf(b"not a pdf"), "not a readable PDF"),
    (lambda o, p: o.pdf(_two_page_pdf(), pages="3"), "page 3 is out of range: the PDF has 2 pages"),
])
def test_user_errors_before_any_model_work(unloaded: OCR, page: Image.Image, call: Any, words: str) -> None:
    with pytest.raises(UserError, match=words):
        call(unloaded, page)
    assert unloaded.pipeline.loaded_models() == []   # refused before loading anything


def test_pdf_given_as_an_image_points_to_pdf(unloaded: OCR, tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(_two_page_pdf())
    with pytest.raises(UserError, match=r"is a PDF: read it with OCR.pdf\(\)"):
        unloaded(path)
    with pytest.raises(UserError, match=r"these bytes are a PDF"):
        unloaded(path.read_bytes())


def test_missing_image_file(unloaded: OCR, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        unloaded(tmp_path / "absent.png")


def test_constructor_mistakes(deepseek_tiny: Path, config: Path) -> None:
    with pytest.raises(UserError, match="unknown option 'max_tokens'"):
        OCR(model_dir=deepseek_tiny, config=config, load=False, max_tokens=8)
    with pytest.raises(UserError, match="mode: 'huge' is not allowed"):
        OCR(model_dir=deepseek_tiny, config=config, load=False, mode="huge")
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-ocr'"):
        OCR("gpt-ocr", config=config, load=False)
    with pytest.raises(UserError, match="mode is a DeepSeek-OCR option"):
        OCR("paddleocr-vl", config=config, load=False, mode="tiny")
    with pytest.raises(UserError, match="backend"):
        OCR(model_dir=deepseek_tiny, config=config, load=False, backend="jax")


def test_api_errors_name_keyword_arguments_not_flags(deepseek_tiny: Path, paddle_tiny: Path, config: Path,
                                                     tmp_path: Path) -> None:
    cases = [
        (dict(model="deepseek-ocr", model_dir=paddle_tiny), r"^model_dir: .* use model='paddleocr-vl'$"),
        (dict(mode="tiny", base_size=640), r"^mode is a preset of base_size"),
        (dict(model_dir=tmp_path / "absent", load=True), r"\(model_dir\)$"),
        (dict(config=tmp_path / "absent.toml"), r"^config: .*absent\.toml does not exist"),
    ]
    for kwargs, words in cases:
        kwargs = {"config": config, "load": False, **kwargs}
        with pytest.raises(UserError, match=words) as caught:
            OCR(**kwargs)
        assert "--" not in str(caught.value), str(caught.value)


def test_api_sampling_without_do_sample_warns_in_keyword_terms(unloaded: OCR, page: Image.Image,
                                                               caplog) -> None:
    with caplog.at_level("WARNING", logger="deepseek_ocr.config"):
        unloaded._request(page, None, {"temperature": 0.4})       # checked before any model work
        unloaded._request(page, None, {"temperature": 0.4, "do_sample": True})
    (record,) = caplog.records
    assert record.getMessage().startswith("temperature is ignored") and "do_sample=True" in record.getMessage()
