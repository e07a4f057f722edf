"""DeepSeek-OCR on PyTorch against goldens recorded from the official remote code (CPU, float32).

The goldens (tests/goldens/deepseek_ocr/model.json + model_logits.npz; how they were made: README.md there)
hold, per case, the official `infer()` prompt ids, its prefill logits at the last prompt position (top-32 and
fixed ids, float32) and the raw logits of each greedy step, and its 24 greedy ids under no_repeat_ngram_size 20.
They were made on the tiny checkpoint of `scripts/ckpt_deepseek_ocr.py`; the test first checks that the
fixture's weights are byte-identical to those, since any other weights make the goldens meaningless.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from common import deepseek_ocr as ds  # noqa: E402
from common.generation import GenerationOptions  # noqa: E402
from common.images import open_image  # noqa: E402
from common.sampling import SamplingOptions  # noqa: E402
from common.timing import Timings  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from torch_ocr import deepseek_ocr as tm  # noqa: E402
from torch_ocr.generate import generate  # noqa: E402
from torch_ocr.sampling import make_no_repeat_ngram  # noqa: E402

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "deepseek_ocr"
sys.path.insert(0, str(GOLDENS))
import patterns  # noqa: E402

META = json.loads((GOLDENS / "model.json").read_text(encoding="utf-8"))
ARRAYS = dict(np.load(GOLDENS / "model_logits.npz"))
CASES = {case["name"]: case for case in META["cases"]}
FIXED = ARRAYS["fixed_indices"]
RTOL = 1e-4
EOS = 1
NGRAM = 20


def close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Relative to the logit scale of the reference: 1e-4 of its largest magnitude, elementwise 1e-4 relative."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * scale, err_msg=what)


class Env:
    """Our model on the fixture snapshot, and a per-case memo of what each test needs."""

    def __init__(self, snapshot: Path) -> None:
        self.snapshot = snapshot
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
        self.model = tm.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self._runs: dict[str, dict] = {}

    def inputs(self, case: dict) -> ds.DeepseekOCRInputs:
        images = [] if case["image"] is None else [case_image(case["image"])]
        return ds.build_inputs(case["prompt"], images, self.tokenizer, base_size=case["base_size"],
                               image_size=case["image_size"], crop_mode=case["crop_mode"])

    def run(self, name: str) -> dict:
        """Prefill, then greedy steps with the n-gram ban, keeping each step's raw logits (simple loop)."""
        if name in self._runs:
            return self._runs[name]
        case = CASES[name]
        inputs = self.inputs(case)
        model = self.model
        embeds = model.encode_images(inputs)
        steps = META["max_new_tokens"]
        length = inputs.input_ids.shape[0]
        cache = model.make_cache(1, length + steps)
        logits = model.prefill(inputs, embeds, cache)
        ban = make_no_repeat_ngram(NGRAM)
        history = torch.as_tensor(inputs.input_ids)[None]
        raw, chosen = [logits[0].numpy().copy()], []
        for index in range(steps):
            token = int(torch.argmax(ban(history, logits), dim=-1))
            chosen.append(token)
            if token == EOS or index + 1 == steps:
                break
            history = torch.cat([history, torch.tensor([[token]])], dim=1)
            logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + index]), cache)
            raw.append(logits[0].numpy().copy())
        self._runs[name] = {"inputs": inputs, "raw": raw, "ids": chosen}
        return self._runs[name]


def case_image(meta: dict):
    if "file" in meta:
        return open_image(GOLDENS / meta["file"])
    image = patterns.make_image(meta["kind"], meta["width"], meta["height"], meta["seed"])
    return open_image(patterns.png_bytes(image))


@pytest.fixture(scope="module")
def env(deepseek_tiny: Path) -> Env:
    weights = deepseek_tiny / "model-00001-of-000001.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest == META["checkpoint"]["safetensors_sha256"], (
        "the tiny checkpoint differs from the one the goldens were recorded on (scripts/ckpt_deepseek_ocr.py "
        "changed?): re-record tests/goldens/deepseek_ocr as its README says")
    return Env(deepseek_tiny)


def unrle(pairs: list[list[int]]) -> list[int]:
    return [token for token, count in pairs for _ in range(count)]


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_ids_equal_official(name: str, env: Env) -> None:
    case = CASES[name]
    assert env.inputs(case).input_ids.tolist() == unrle(case["ids_rle"])


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_logits_match_official(name: str, env: Env) -> None:
    first = env.run(name)["raw"][0]
    assert first.dtype == np.float32 and first.shape == (env.model.config.language.vocab_size,)
    top = ARRAYS[f"{name}.top_indices"]
    close(first[top], ARRAYS[f"{name}.top_values"], f"{name}: prefill logits at the reference's top-32 ids")
    close(first[FIXED], ARRAYS[f"{name}.fixed_values"], f"{name}: prefill logits at fixed ids")
    stats = CASES[name]["prefill_stats"]
    assert int(first.argmax()) == stats["argmax"]
    assert abs(float(first.astype(np.float64).mean()) - stats["mean"]) <= RTOL * abs(stats["max"])
    assert abs(float(first.astype(np.float64).std()) - stats["std"]) <= RTOL * stats["std"]


@pytest.mark.parametrize("name", list(CASES))
def test_step_logits_match_official(name: str, env: Env) -> None:
    run = env.run(name)
    ref_fixed, ref_chosen = ARRAYS[f"{name}.step_fixed"], ARRAYS[f"{name}.step_chosen"]
    steps = min(len(run["raw"]), len(ref_fixed))
    for k in range(steps):
        close(run["raw"][k][FIXED], ref_fixed[k], f"{name}: raw logits at fixed ids, step {k}")
        token = run["ids"][k] if k < len(run["ids"]) else None
        if token is not None and token == CASES[name]["new_tokens"][k]:
            close(run["raw"][k][token:token + 1], ref_chosen[k:k + 1], f"{name}: chosen logit, step {k}")


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_ids_equal_official(name: str, env: Env) -> None:
    assert env.run(name)["ids"] == CASES[name]["new_tokens"]


@pytest.mark.parametrize("name", ["palette_tiled", "just_over", "text_only", "page_3x2"])
def test_shared_generate_loop_gives_official_ids(name: str, env: Env) -> None:
    """The project's generate loop (greedy + n-gram 20 over the whole sequence, EOS stop) gives the same ids."""
    case = CASES[name]
    options = GenerationOptions(max_new_tokens=META["max_new_tokens"], stop_token_ids=(EOS,),
                                sampling=SamplingOptions(no_repeat_ngram_size=NGRAM))
    ids = [t.token_id for t in generate(env.model, env.inputs(case), options, Timings())]
    assert ids == case["new_tokens"]


def test_goldens_exercise_the_ngram_ban() -> None:
    """palette_tiled repeats one id 20 times; the official ban makes the 21st differ (RULES 12)."""
    new = CASES["palette_tiled"]["new_tokens"]
    assert len(set(new[3:23])) == 1 and new[23] != new[22]
