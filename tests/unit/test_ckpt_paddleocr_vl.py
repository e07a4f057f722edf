"""The PaddleOCR-VL snapshot builder writes the real layout, and our torch module has exactly the real names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from common.model_config import PaddleOCRVLConfig
from scripts import ckpt_paddleocr_vl as ckpt

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "paddleocr-vl"
UNUSED = ("visual.vision_model.embeddings.packing_position_embedding.", "visual.vision_model.head.")


def _manifest() -> list[tuple[str, tuple[int, ...]]]:
    data = json.loads((REFERENCE / "manifest_full.json").read_text())
    return sorted((name, tuple(shape)) for name, shape, _ in data["tensors"])


def test_full_plan_equals_real_manifest() -> None:
    assert ckpt.tensor_plan(ckpt.make_config("full")) == _manifest()


def test_full_config_is_the_real_one_apart_from_dtype() -> None:
    real = json.loads((REFERENCE / "config.json").read_text())
    assert ckpt.make_config("full", "bfloat16") == real


def test_torch_module_names_and_shapes_equal_manifest_after_skip() -> None:
    torch = pytest.importorskip("torch")
    from torch_ocr import paddleocr_vl as model_file

    config = PaddleOCRVLConfig.from_file(REFERENCE / "config.json")
    with torch.device("meta"):
        model = model_file.PaddleOCRVL(config)
    ours = sorted((name, tuple(t.shape)) for name, t in model.state_dict().items())
    expected = sorted((model_file.sanitize({n: None}).popitem()[0], s) for n, s in _manifest()
                      if not n.startswith(UNUSED))
    assert ours == expected
    assert all(model_file.is_skipped(n) == n.startswith(UNUSED) for n, _ in _manifest())


def test_tiny_snapshot_files_and_tensors(paddle_tiny: Path) -> None:
    for name in ("config.json", "preprocessor_config.json", "generation_config.json", "chat_template.jinja",
                 "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (paddle_tiny / name).is_file(), name
    raw = json.loads((paddle_tiny / "config.json").read_text())
    real = json.loads((REFERENCE / "config.json").read_text())
    assert set(raw) == set(real) and set(raw["vision_config"]) == set(real["vision_config"])
    config = PaddleOCRVLConfig.from_file(paddle_tiny / "config.json")
    assert config.text.vocab_size == 103424 and config.vision.position_grid == 27
    assert config.text.head_dim == 16 and sum(config.text.mrope_section) == 8
    with safe_open(str(paddle_tiny / "model.safetensors"), framework="pt") as f:
        stored = sorted((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"
    assert stored == ckpt.tensor_plan(raw)
    assert any(n.startswith(UNUSED[0]) for n, _ in stored) and any(n.startswith(UNUSED[1]) for n, _ in stored)
    for name in ("chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (paddle_tiny / name).read_bytes() == (REFERENCE / name).read_bytes()


@pytest.mark.slow
def test_tiny_tokenizer_keeps_real_special_ids_and_every_id_decodes(paddle_tiny: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(paddle_tiny / "tokenizer.json"))
    specials = json.loads((REFERENCE / "special_tokens.json").read_text())
    for group in ("verified", "assumed"):
        for name, entry in specials[group].items():
            assert tok.token_to_id(name) == entry["id"], name
    assert tok.get_vocab_size() == 103424
    decoded = tok.decode_batch([[i] for i in range(103424)], skip_special_tokens=False)
    assert all(decoded), [i for i, text in enumerate(decoded) if not text][:5]
    assert tok.decode(tok.encode("Table Recognition: 12.5%").ids) == "Table Recognition: 12.5%"
    config = json.loads((paddle_tiny / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (REFERENCE / "chat_template.jinja").read_text()


@pytest.mark.slow
def test_builds_are_seeded_and_bf16_is_stored_as_bf16(tmp_path: Path, paddle_tiny: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    ckpt.build(tmp_path / "same", size="tiny", seed=0, dtype="float32")
    ckpt.build(tmp_path / "other", size="tiny", seed=1, dtype="bfloat16")
    a = load_file(str(paddle_tiny / "model.safetensors"))
    b = load_file(str(tmp_path / "same" / "model.safetensors"))
    c = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert c["lm_head.weight"].dtype == torch.bfloat16
    assert not torch.equal(a["lm_head.weight"].bfloat16(), c["lm_head.weight"])
    assert json.loads((tmp_path / "other" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_lm_head_is_not_tied(paddle_tiny: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    weights = load_file(str(paddle_tiny / "model.safetensors"))
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_transformers_loads_tiny_snapshot_with_no_missing_or_unexpected(paddle_tiny: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model, info = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(
        str(paddle_tiny), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    # The unused groups are dropped by transformers' own ignore list, not reported.
    assert not info["unexpected_keys"]
    from safetensors.torch import load_file

    weights = load_file(str(paddle_tiny / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert torch.equal(model.model.projector.linear_1.weight, weights["mlp_AR.linear_1.weight"])


@pytest.mark.slow
def test_loader_is_strict_and_skips_unused_by_name(tmp_path: Path, paddle_tiny: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from common.errors import CheckpointError
    from torch_ocr import paddleocr_vl as model_file

    weights = load_file(str(paddle_tiny / "model.safetensors"))
    config = paddle_tiny / "config.json"
    # Without the unused groups the checkpoint still loads: they are skipped by name, never required.
    used = {k: v for k, v in weights.items() if not k.startswith(UNUSED)}
    save_file(used, str(tmp_path / "used.safetensors"))
    model = model_file.load(config, tmp_path / "used.safetensors", dtype="float32", device="cpu")
    assert torch.equal(model.mlp_AR.linear_2.weight, weights["mlp_AR.linear_2.weight"])
    missing = {k: v for k, v in used.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        model_file.load(config, tmp_path / "missing.safetensors", dtype="float32", device="cpu")
    extra = {**used, "model.layers.9.mlp.up_proj.weight": used["model.layers.1.mlp.up_proj.weight"].clone()}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        model_file.load(config, tmp_path / "extra.safetensors", dtype="float32", device="cpu")
