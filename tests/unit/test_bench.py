"""scripts/bench.py on the tiny checkpoints: the report's structure, never its timings (they depend on the machine)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import bench

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("vision.prepare_inputs", "vision.compute_embeddings", "prompt.render", "prompt.build_tokens",
          "decode.prefill", "decode.iterative", "decode.generate")
RUN_FIELDS = ("load_s", "ttft_ms", "prompt_tokens", "completion_tokens", "prefill_tok_s", "decode_tok_s",
              "vision_prefill_ms", "peak_rss_bytes", "active_bytes_per_token", "bandwidth_gb_s", "timings_ms")


def _bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--max-new-tokens", "2",
                           "--dtype", "float32", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(out.read_text())


def _check_run(run: dict, prompt_tokens: int | None = None) -> None:
    assert "error" not in run, run.get("error")
    for key in RUN_FIELDS:
        assert key in run, key
    assert run["completion_tokens"] == 2  # ignore_eos: the fixed decode length
    assert run["prompt_tokens"] > 0 and run["peak_rss_bytes"] > 0 and run["active_bytes_per_token"] > 0
    assert run["ttft_ms"] > 0 and run["load_s"] > 0
    assert run["timing_calls"]["decode.iterative"] == 1  # one step after the token the prefill gives
    if prompt_tokens is not None:
        assert run["prompt_tokens"] == prompt_tokens


def test_deepseek_ours_only_without_reference_setup(tmp_path: Path, deepseek_tiny: Path) -> None:
    stdout, data = _bench(tmp_path, "--model", "deepseek-ocr", "--backend", "torch", "--checkpoint",
                          str(deepseek_tiny))
    assert "--reference-code DIR --reference-python" in stdout  # how to set the reference up, then carry on
    (run,) = data["runs"]
    assert (run["model"], run["impl"], run["backend"], run["dtype"]) == ("deepseek-ocr", "ours", "torch", "float32")
    _check_run(run)
    assert set(STAGES) <= set(run["timings_ms"])
    assert data["ratios"] == [] and data["max_new_tokens"] == 2
    for key in ("platform", "chip", "mlx", "metal_available", "torch", "revision"):
        assert key in data["platform"]
    for header in ("load s", "TTFT ms", "prefill t/s", "decode t/s", "GB/s", "peak RSS GB", *STAGES):
        assert header in stdout


def test_paddle_with_transformers_reference(tmp_path: Path, paddle_tiny: Path) -> None:
    pytest.importorskip("transformers")
    stdout, data = _bench(tmp_path, "--model", "paddleocr-vl", "--checkpoint", str(paddle_tiny))
    ours, ref = data["runs"]
    assert (ours["impl"], ref["impl"]) == ("ours", "reference")
    _check_run(ours)
    _check_run(ref, prompt_tokens=ours["prompt_tokens"])  # the reference decodes the inputs we captured
    assert ref["backend"].startswith("transformers ") and ref["versions"]["transformers"]
    (ratio,) = data["ratios"]
    for key in ("vision_prefill_speedup", "decode_speedup", "ttft_speedup", "load_speedup", "memory_ratio"):
        assert ratio[key] is not None and ratio[key] > 0
    assert "ours / reference" in stdout


@pytest.mark.parametrize("model, fixture", [("paddleocr-vl-1.5", "paddle15_tiny"), ("glm-ocr", "glm_tiny"),
                                            ("deepseek-ocr-2", "deepseek2_tiny")])
def test_newer_models_with_their_transformers_reference(tmp_path: Path, model: str, fixture: str,
                                                        request: pytest.FixtureRequest) -> None:
    """Each newer model against transformers' own class on the same snapshot, decoding the inputs we captured."""
    pytest.importorskip("transformers")
    stdout, data = _bench(tmp_path, "--model", model, "--checkpoint", str(request.getfixturevalue(fixture)))
    ours, ref = data["runs"]
    assert (ours["model"], ours["impl"], ref["model"], ref["impl"]) == (model, "ours", model, "reference")
    _check_run(ours)
    _check_run(ref, prompt_tokens=ours["prompt_tokens"])
    assert ref["backend"].startswith("transformers ") and ref["timings_ms"]["vision.compute_embeddings"] > 0
    (ratio,) = data["ratios"]
    assert ratio["model"] == model and ratio["decode_speedup"] > 0
    assert f"{model} " in stdout and "DeepSeek-OCR reference skipped" not in stdout


def test_deepseek2_reference_config_has_the_real_checkpoints_size() -> None:
    """The transformers config bench_reference writes for the published config.json builds a model with exactly
    the parameters of the published checkpoint (its manifest), so the full-size reference loads the same weights."""
    transformers = pytest.importorskip("transformers")
    import math

    import torch

    from scripts import bench_reference

    reference = ROOT / "tests" / "data" / "reference" / "deepseek-ocr-2"
    original = json.loads((reference / "config.json").read_text())
    config = transformers.DeepseekOcr2Config(**bench_reference.deepseek2_config(original))
    with torch.device("meta"):
        model = transformers.DeepseekOcr2ForConditionalGeneration(config)
    manifest = json.loads((reference / "manifest_full.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(shape) for _, shape, _ in manifest)
    assert config.text_config.mlp_layer_types[:2] == ["dense", "sparse"]  # first_k_dense_replace 1


def test_active_weight_bytes_counts_glm_decoder_without_its_mtp_layer(tmp_path: Path) -> None:
    """GLM-OCR's decoder is under model.language_model.; the multi-token-prediction layer (index
    num_hidden_layers) is never run by a decode step, and neither is the vision tower."""
    tensors = {"model.language_model.embed_tokens.weight": [100, 8],
               "model.language_model.layers.0.self_attn.q_proj.weight": [8, 8],
               "model.language_model.layers.1.mlp.down_proj.weight": [8, 16],
               "model.language_model.layers.2.eh_proj.weight": [8, 16],
               "model.language_model.layers.2.self_attn.q_proj.weight": [8, 8],
               "model.language_model.norm.weight": [8], "model.visual.blocks.0.attn.qkv.weight": [24, 8],
               "lm_head.weight": [100, 8]}
    header = json.dumps({name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in tensors.items()}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"num_hidden_layers": 2, "tie_word_embeddings": False}}))
    active, params = bench.active_weight_bytes(tmp_path, "glm-ocr", "bfloat16")
    assert active == (64 + 128 + 8 + 800) * 2  # layers 0-1, final norm, head
    assert params == 800 + 64 + 128 + 128 + 64 + 8 + 192 + 800


def test_active_weight_bytes_counts_what_a_decode_step_reads(tmp_path: Path) -> None:
    """Decoder weights whole, routed experts at top-k/n, vision and the embedding lookup not at all."""
    tensors = {"model.embed_tokens.weight": [100, 8], "model.sam_model.blocks.0.w": [50, 50],
               "model.layers.0.self_attn.q_proj.weight": [8, 8],
               "model.layers.1.mlp.experts.0.up_proj.weight": [16, 8],
               "model.layers.1.mlp.experts.1.up_proj.weight": [16, 8],
               "model.layers.1.mlp.shared_experts.up_proj.weight": [16, 8],
               "model.norm.weight": [8], "lm_head.weight": [100, 8]}
    header = json.dumps({name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in tensors.items()}).encode()
    (tmp_path / "model-00001-of-000001.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "config.json").write_text(json.dumps(
        {"language_config": {"n_routed_experts": 2, "num_experts_per_tok": 1}}))
    active, params = bench.active_weight_bytes(tmp_path, "deepseek-ocr", "bfloat16")
    # 64 attention + 2 x 128 experts x 1/2 + 128 shared + 8 norm + 800 head = 1128 elements of 2 bytes
    assert active == 1128 * 2
    assert params == 800 + 2500 + 64 + 3 * 128 + 8 + 800
    assert bench.active_weight_bytes(tmp_path, "deepseek-ocr", "float32")[0] == 1128 * 4


def test_batched_runs_and_their_scaling_rows(tmp_path: Path, paddle_tiny: Path) -> None:
    """--batch 1,2: ours through Pipeline.map and transformers' batched generate, per batch size, with the
    batch-scaling table; the batch's throughput counts every row."""
    pytest.importorskip("transformers")
    stdout, data = _bench(tmp_path, "--model", "paddleocr-vl", "--checkpoint", str(paddle_tiny), "--batch", "1,2")
    runs = {(run["impl"], run["batch"]): run for run in data["runs"]}
    assert set(runs) == {("ours", 1), ("reference", 1), ("ours", 2), ("reference", 2)}
    for run in runs.values():
        _check_run(run)
        assert run["pages_per_min"] > 0
    assert {row["batch"] for row in data["ratios"]} == {1, 2}
    assert "batch B decode throughput / batch 1" in stdout
