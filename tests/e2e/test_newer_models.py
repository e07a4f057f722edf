"""The newer models (deepseek-ocr-2, glm-ocr, paddleocr-vl-1.5) through every front end, on their tiny snapshots.

One page, one prompt per case (the default prompts and the task prompts): the installed `deepseek-ocr-cli` as a
subprocess, the Python API (`common.api.OCR`) in this process and the real server on 127.0.0.1 driven by the
openai SDK must give the same answer, and its token ids must be those transformers' own model class generates
greedily on the same snapshot. The reference is fed the arrays our preprocessing builds (held to transformers'
processors by the parity tests), through the same conversions `scripts/bench_reference.py` uses, so the pipeline,
engine, sampling, decoding, CLI and server are all on the checked side. The prompt texts below are written out
as the models document them, not read from our task tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.test_server import ServerProcess, data_url

CLI = Path(sys.executable).parent / "deepseek-ocr-cli"
KEY = "newer-models-key"
NEW_TOKENS = 6
NEWER = ("deepseek-ocr-2", "glm-ocr", "paddleocr-vl-1.5")
FIXTURES = {"deepseek-ocr-2": "deepseek2_tiny", "glm-ocr": "glm_tiny", "paddleocr-vl-1.5": "paddle15_tiny"}
#: Stop ids: DeepSeek's EOS, GLM-OCR's <|endoftext|> and <|user|>, PaddleOCR-VL's </s>.
EOS = {"deepseek-ocr-2": (1,), "glm-ocr": (59246, 59253), "paddleocr-vl-1.5": (2,)}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CLI.exists(), reason="console script not installed (pip install -e .)")]


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    cli: tuple[str, ...]        # what the CLI gets beyond model, folder, image and limits
    api: dict                   # keyword arguments of the Python API call
    text: str                   # the text part of the server's message (after the image part)
    prompt: str                 # the prompt our preprocessing gets for the reference's inputs


CASES = [
    Case("deepseek-ocr-2-default", "deepseek-ocr-2", (), {}, "<|grounding|>Convert the document to markdown.",
         "<image>\n<|grounding|>Convert the document to markdown."),
    Case("deepseek-ocr-2-free-ocr", "deepseek-ocr-2", ("--prompt", r"<image>\nFree OCR."),
         {"prompt": "<image>\nFree OCR."}, "Free OCR.", "<image>\nFree OCR."),
    Case("glm-ocr-default", "glm-ocr", (), {}, "Text Recognition:", "Text Recognition:"),
    Case("glm-ocr-table", "glm-ocr", ("--task", "table"), {"task": "table"}, "Table Recognition:",
         "Table Recognition:"),
    Case("glm-ocr-formula", "glm-ocr", ("--task", "formula"), {"task": "formula"}, "Formula Recognition:",
         "Formula Recognition:"),
    Case("paddleocr-vl-1.5-default", "paddleocr-vl-1.5", (), {}, "OCR:", "OCR:"),
    Case("paddleocr-vl-1.5-spotting", "paddleocr-vl-1.5", ("--task", "spotting"), {"task": "spotting"},
         "Spotting:", "Spotting:"),
    Case("paddleocr-vl-1.5-seal", "paddleocr-vl-1.5", ("--task", "seal"), {"task": "seal"},
         "Seal Recognition:", "Seal Recognition:"),
]


@pytest.fixture(scope="module")
def snapshots(request: pytest.FixtureRequest) -> dict[str, Path]:
    return {model: request.getfixturevalue(fixture) for model, fixture in FIXTURES.items()}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A white page with a black rule and a grey block (small enough for one view in every model)."""
    path = tmp_path_factory.mktemp("newer-images") / "page.png"
    image = Image.new("RGB", (200, 140), (255, 255, 255))
    for x in range(20, 180):
        image.putpixel((x, 50), (0, 0, 0))
    image.paste((90, 90, 90), (30, 80, 110, 120))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("newer-models")
    (folder / "config.toml").touch()  # the built-in defaults
    return folder


# ------------------------------------------------------------------------------------------------ the reference
class Reference:
    """transformers' model of each snapshot (float32, CPU), loaded once; greedy ids for our prepared inputs."""

    def __init__(self, snapshots: dict[str, Path], scratch: Path) -> None:
        self.torch = pytest.importorskip("torch")
        pytest.importorskip("transformers")
        from scripts import bench_reference

        self.br, self.snapshots, self.scratch, self.models = bench_reference, snapshots, scratch, {}

    def _model(self, model: str):
        if model not in self.models:
            snap, dtype = self.snapshots[model], self.torch.float32
            if model == "deepseek-ocr-2":
                loaded = self.br.load_deepseek2(snap, dtype, self.scratch)
            elif model == "glm-ocr":
                loaded = self.br.load_glm(snap, dtype)
            else:
                loaded = self.br.load_paddle(snap, dtype)
            self.models[model] = loaded[0]
        return self.models[model]

    def arrays(self, case: Case, image: Image.Image) -> dict[str, np.ndarray]:
        """Our preprocessing of the case's prompt and page, as the arrays the reference takes."""
        from common import deepseek_ocr2, glm_ocr, paddleocr_vl
        from common.tokenizer import Tokenizer

        snap = self.snapshots[case.model]
        tokenizer = Tokenizer.from_files(snap / "tokenizer.json")
        if case.model == "deepseek-ocr-2":
            inputs = deepseek_ocr2.build_inputs(case.prompt, [image], tokenizer)
            (view,) = inputs.images
            return {"input_ids": inputs.input_ids, "global_view": view.global_view, "tiles": view.tiles}
        build = glm_ocr.build_inputs if case.model == "glm-ocr" else paddleocr_vl.build_inputs
        preprocessor = json.loads((snap / "preprocessor_config.json").read_text(encoding="utf-8"))
        inputs = build(case.prompt, [image], tokenizer, paddleocr_vl.load_chat_template(snap), preprocessor)
        return {"input_ids": inputs.input_ids, "pixel_values": inputs.pixel_values,
                "image_grid_thw": inputs.image_grid_thw}

    def answer(self, case: Case, image: Image.Image) -> tuple[int, list[int], str]:
        """(prompt tokens, generated ids without the stop token, finish reason) of a greedy generate."""
        arrays, snap, dtype = self.arrays(case, image), self.snapshots[case.model], self.torch.float32
        if case.model == "deepseek-ocr-2":
            kwargs = self.br.deepseek2_kwargs(arrays, dtype)
        elif case.model == "glm-ocr":
            kwargs = self.br.glm_kwargs(snap, arrays, dtype)
        else:
            kwargs = self.br.paddle_kwargs(snap, arrays, dtype)
        with self.torch.inference_mode():
            out = self._model(case.model).generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                   eos_token_id=list(EOS[case.model]))
        ids = out[0, kwargs["input_ids"].shape[1]:].tolist()
        if ids and ids[-1] in EOS[case.model]:
            return len(arrays["input_ids"]), ids[:-1], "stop"
        return len(arrays["input_ids"]), ids, "length"


@pytest.fixture(scope="module")
def reference(snapshots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(snapshots, tmp_path_factory.mktemp("newer-reference"))


# ------------------------------------------------------------------------------------------------ front ends
def run_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEEPSEEK_OCR", "HF_"))}
    env.update(HOME=str(workdir / "home"), XDG_CONFIG_HOME=str(workdir / "xdg-config"),
               XDG_CACHE_HOME=str(workdir / "xdg-cache"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([str(CLI), "--config", str(workdir / "config.toml"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def library(snapshots: dict[str, Path], workdir: Path):
    from common.api import OCR

    loaded: dict[str, OCR] = {}

    def get(model: str) -> OCR:
        if model not in loaded:
            loaded[model] = OCR(model, model_dir=snapshots[model], backend="torch", device="cpu",
                                config=workdir / "config.toml", max_new_tokens=NEW_TOKENS)
        return loaded[model]

    return get


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, snapshots: dict[str, Path]):
    proc = ServerProcess(tmp_path_factory.mktemp("newer-server"), snapshots, api_key=KEY, max_resident_models=1)
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.base}/v1", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------------------ tests
def test_models_list_names_the_newer_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(NEWER) <= set(models)
    for model in NEWER:
        assert isinstance(models[model].model_extra["loaded"], bool)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_cli_library_and_server_give_the_reference_answer(case: Case, snapshots: dict[str, Path], page: Path,
                                                          workdir: Path, reference: Reference, library,
                                                          client: openai.OpenAI) -> None:
    prompt_tokens, ids, finish = reference.answer(case, Image.open(page).convert("RGB"))
    assert ids, "the tiny checkpoint must not stop at once"

    proc = run_cli(workdir, "--model", case.model, "--model-dir", str(snapshots[case.model]), "--image", str(page),
                   "--format", "json", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--backend",
                   "torch", *case.cli)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)
    assert (cli["model"], cli["backend"], cli["dtype"]) == (case.model, "torch", "float32")
    assert (cli["token_ids"], cli["prompt_tokens"], cli["finish_reason"]) == (ids, prompt_tokens, finish)

    api = dict(case.api)
    result = library(case.model)(str(page), prompt=api.pop("prompt", None), **api)
    assert (result.token_ids, result.prompt_tokens, result.finish_reason) == (ids, prompt_tokens, finish)
    assert result.text == cli["text"] and result.text.strip()

    answer = client.chat.completions.create(
        model=case.model, max_tokens=NEW_TOKENS,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(page.read_bytes())}},
                                               {"type": "text", "text": case.text}]}])
    assert answer.model == case.model
    assert answer.choices[0].message.content == cli["text"]
    assert answer.choices[0].finish_reason == finish
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        prompt_tokens, len(ids) + (finish == "stop"))
