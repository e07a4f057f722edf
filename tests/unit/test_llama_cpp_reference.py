"""scripts/llama_cpp_reference.py without llama.cpp: its log parser on a captured log, the command lines it builds,
the converter shims and the bench rows it adds.

Nothing here fetches, builds, converts or runs llama.cpp (that takes cmake, a compiler and tens of minutes): the
end-to-end path is run by hand, `python scripts/bench.py --llama-cpp ...`, and stays outside the test suite.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import bench
from scripts import llama_cpp_reference as llama

DATA = Path(__file__).resolve().parents[1] / "data" / "llama_cpp"
#: Read off the captured logs by hand (tiny snapshots, 8 new tokens, 2 threads, on a busy machine).
EXPECTED_PADDLE = {
    # one encode batch after the first text chunk ("done = 1"): inside the prompt-eval clock, taken out of it
    "vision_ms": 820.0, "image_slices": 1, "image_decode_ms": 511.0, "prompt_eval_ms": 1660.68,
    "prefill_ms": pytest.approx(1660.68 - 820.0), "prompt_tokens": 1067, "decode_ms": 108.25, "decode_runs": 7,
    "load_ms": pytest.approx(1036.706)}  # the stamp of the first "encoding mtmd batch" line
EXPECTED_DEEPSEEK = {
    # the first batch (3 chunks, "done = 0") comes before any prompt decode; the second (1 chunk) inside
    "vision_ms": 45599.0 + 16304.0, "image_slices": 4, "image_decode_ms": 580.0 + 592.0 + 584.0 + 608.0,
    "prompt_eval_ms": 19310.04, "prefill_ms": pytest.approx(19310.04 - 16304.0), "prompt_tokens": 913,
    "decode_ms": 1849.04, "decode_runs": 7, "load_ms": pytest.approx(1336.166)}


def test_parse_log_on_a_captured_paddleocr_vl_log() -> None:
    parsed = llama.parse_log((DATA / "mtmd-cli-paddleocr-vl-tiny.log").read_text(encoding="utf-8"))
    assert parsed == EXPECTED_PADDLE


def test_parse_log_on_a_captured_deepseek_ocr_log_sums_the_image_slices() -> None:
    parsed = llama.parse_log((DATA / "mtmd-cli-deepseek-ocr-tiny.log").read_text(encoding="utf-8"))
    assert parsed == EXPECTED_DEEPSEEK


def test_prefill_leaves_in_an_encode_that_runs_before_any_prompt_decode() -> None:
    log = ("0.00.500.250 I encoding mtmd batch, n_chunks = 2 (done = 0, total = 4)\n"
           "0.00.900.000 I mtmd batch encoding done in 300 ms\n"
           "0.00.950.000 I encoding mtmd batch, n_chunks = 1 (done = 2, total = 4)\n"
           "0.01.150.000 I mtmd batch encoding done in 200 ms\n"
           "llama_perf_context_print: prompt eval time =     800.50 ms /   100 tokens (    8.00 ms per token,"
           "   124.92 tokens per second)\n"
           "llama_perf_context_print:        eval time =     400.00 ms /     8 runs   (   50.00 ms per token,"
           "    20.00 tokens per second)\n")
    parsed = llama.parse_log(log)
    assert parsed["vision_ms"] == 500.0 and parsed["image_slices"] == 3 and parsed["load_ms"] == 500.25
    assert parsed["prefill_ms"] == pytest.approx(600.5) and parsed["prompt_tokens"] == 100
    assert llama.derive(parsed) == {"prefill_tok_s": pytest.approx(100 / 0.6005), "decode_tok_s": 20.0}


def test_parse_log_without_timings_gives_nones() -> None:
    parsed = llama.parse_log("main: loading model\nerror: something\n")
    assert parsed["vision_ms"] is None and parsed["prompt_tokens"] is None and parsed["decode_runs"] is None
    assert llama.derive(parsed) == {"prefill_tok_s": None, "decode_tok_s": None}


def test_run_command_lines() -> None:
    paddle = llama.run_command(Path("bin/cli"), Path("t.gguf"), Path("m.gguf"), Path("page.png"), "OCR:",
                               "paddleocr-vl", 32, threads=2)
    assert paddle[:7] == ["bin/cli", "-m", "t.gguf", "--mmproj", "m.gguf", "--image", "page.png"]
    for flag, value in (("-p", "OCR:"), ("-n", "32"), ("-t", "2"), ("-tb", "2"), ("--temp", "0"),
                        ("-c", str(llama.CONTEXT)), ("-lv", "4")):
        assert paddle[paddle.index(flag) + 1] == value, flag
    assert {"--ignore-eos", "--perf", "--jinja", "--no-warmup"} <= set(paddle)
    deepseek = llama.run_command(Path("cli"), Path("t"), Path("m"), Path("p"), llama.prompt_for("deepseek-ocr"),
                                 "deepseek-ocr", 8, threads=4, warmup=True)
    assert deepseek[deepseek.index("--chat-template") + 1] == "deepseek-ocr"
    assert "--jinja" not in deepseek and "--no-warmup" not in deepseek
    assert deepseek[deepseek.index("-p") + 1] == "<__media__>\n<|grounding|>Convert the document to markdown."
    assert llama.prompt_for("paddleocr-vl") == "OCR:"  # the CLI puts the image marker first itself


def test_convert_command_lines(tmp_path: Path) -> None:
    text = llama.convert_command(Path("py"), Path("src"), Path("snap"), Path("out.gguf"), "q8_0", mmproj=False)
    assert text == ["py", str(Path("src") / "convert_hf_to_gguf.py"), "snap", "--outtype", "q8_0",
                    "--outfile", "out.gguf"]
    vision = llama.convert_command(Path("py"), Path("src"), Path("snap"), Path("mm.gguf"), "bf16", mmproj=True)
    assert vision[-1] == "--mmproj" and vision[vision.index("--outtype") + 1] == "bf16"
    paths = llama.gguf_paths(tmp_path, tmp_path)
    assert sorted(paths) == ["bf16", "mmproj", "q8_0"] and paths["q8_0"].name == "text-q8_0.gguf"


def _byte_level_tokenizer() -> dict:
    """A small tokenizer.json like our stand-in: specials, the 256 byte-level characters, a few merged pieces."""
    specials = ["<unk>", "<s>", "</s>", "<|IMAGE_PLACEHOLDER|>"]
    vocab = {name: i for i, name in enumerate(specials)}
    for char in llama._byte_level_decoder():
        vocab[char] = len(vocab)
    for piece in ("OC", "\u0120h", "el", "\u0120hello"):
        vocab[piece] = len(vocab)
    return {"model": {"type": "BPE", "vocab": vocab, "unk_token": "<unk>"},
            "added_tokens": [{"id": i, "content": name, "special": True} for i, name in enumerate(specials)]}


def test_sentencepiece_model_keeps_ids_specials_and_bytes() -> None:
    spm = pytest.importorskip("sentencepiece")
    tokenizer = _byte_level_tokenizer()
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(llama.sentencepiece_model(tokenizer))
    vocab = tokenizer["model"]["vocab"]
    assert processor.vocab_size() == len(vocab)
    assert processor.IsUnknown(0) and processor.IsControl(3) and processor.IdToPiece(3) == "<|IMAGE_PLACEHOLDER|>"
    assert processor.IdToPiece(vocab["\u0120hello"]) == "\u2581hello"  # byte-level space -> SentencePiece's
    assert processor.IdToPiece(vocab["A"]) == "<0x41>" and processor.IsByte(vocab["A"])
    assert sum(processor.IsByte(i) for i in range(processor.vocab_size())) == 256


def test_stage_checkpoint_links_files_and_adds_shims_without_touching_the_snapshot(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "tokenizer.json").write_text(json.dumps(_byte_level_tokenizer()))
    before = sorted(p.name for p in snapshot.iterdir())
    paddle = llama.stage_checkpoint(snapshot, "paddleocr-vl", tmp_path / "paddle")
    assert (paddle / "config.json").is_symlink() and (paddle / "tokenizer.model").stat().st_size > 0
    deepseek = llama.stage_checkpoint(snapshot, "deepseek-ocr", tmp_path / "deepseek")
    processor = json.loads((deepseek / "processor_config.json").read_text())["image_processor"]
    assert processor == {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert not (deepseek / "tokenizer.model").exists()
    assert sorted(p.name for p in snapshot.iterdir()) == before


def test_patch_converter_applies_once_and_refuses_changed_sources(tmp_path: Path) -> None:
    for relative, anchor, _ in llama.CONVERTER_PATCHES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("class A:\n" + anchor + "        pass\n")
    llama.patch_converter(tmp_path)
    once = {r: (tmp_path / r).read_text() for r, _, _ in llama.CONVERTER_PATCHES}
    llama.patch_converter(tmp_path)
    assert {r: (tmp_path / r).read_text() for r in once} == once
    for relative, anchor, addition in llama.CONVERTER_PATCHES:
        assert once[relative] == "class A:\n" + anchor + addition + "        pass\n"
    (tmp_path / llama.CONVERTER_PATCHES[0][0]).write_text("something else\n")
    with pytest.raises(RuntimeError, match="CONVERTER_PATCHES"):
        llama.patch_converter(tmp_path)


def test_an_unwired_model_is_skipped_without_preparing_anything(tmp_path: Path) -> None:
    record = llama.measure("glm-ocr", tmp_path, tmp_path / "page.png", 4, "bf16", cache=tmp_path / "cache")
    assert record["error"].startswith("skipped") and not (tmp_path / "cache").exists()


def _plan(tmp_path: Path, *extra: str) -> tuple[list[bench.Config], list[str]]:
    notes: list[str] = []
    args = bench.parse_args(["--model", "paddleocr-vl", "--checkpoint", str(tmp_path), "--dtype", "bfloat16",
                             "--no-reference", *extra])
    return bench._plan(args, notes), notes


def test_bench_adds_llama_cpp_rows_only_with_the_flag(tmp_path: Path) -> None:
    plain, notes = _plan(tmp_path)
    assert [c.impl for c in plain] == ["ours"] and not any("llama.cpp" in n for n in notes)
    rows, notes = _plan(tmp_path, "--llama-cpp", "--llama-cpp-threads", "2")
    assert [(c.impl, c.dtype, c.batch) for c in rows] == [("ours", "bfloat16", 1), ("llama.cpp", "BF16", 1),
                                                         ("llama.cpp", "Q8_0", 1)]
    assert any("2 threads" in n for n in notes)
    batched, notes = _plan(tmp_path, "--llama-cpp", "--batch", "4")
    assert [c.impl for c in batched] == ["ours"] and any("batch 1 only" in n for n in notes)


def test_bench_ratios_and_table_against_llama_cpp(tmp_path: Path) -> None:
    def record(vision: float, prefill: float, decode: float, rss: float) -> dict:
        return {"timings_ms": {"vision.compute_embeddings": vision}, "prefill_tok_s": prefill,
                "decode_tok_s": decode, "peak_rss_bytes": rss, "load_s": 1.0, "ttft_ms": None,
                "vision_prefill_ms": vision + 10, "prompt_tokens": 100, "pages_per_min": None,
                "bandwidth_gb_s": None}

    ours = bench.Config("paddleocr-vl", "ours", "torch", "bfloat16", tmp_path, record=record(100, 500, 20, 2e9))
    theirs = bench.Config("paddleocr-vl", "llama.cpp", "llama.cpp", "Q8_0", tmp_path,
                          record=record(200, 250, 40, 1e9))
    failed = bench.Config("paddleocr-vl", "llama.cpp", "llama.cpp", "BF16", tmp_path, record={"error": "x"})
    (row,) = bench.llama_cpp_ratios([ours, theirs, failed])
    assert row == {"model": "paddleocr-vl", "backend": "torch", "dtype": "bfloat16", "llama_cpp": "Q8_0",
                   "vision_speedup": 2.0, "prefill_speedup": 2.0, "decode_speedup": 0.5, "memory_ratio": 2.0}
    text = bench.render({"chip": "x"}, [ours, theirs, failed], [], [], [row])
    assert "ours / llama.cpp" in text and "Q8_0" in text
    assert "ours / llama.cpp" not in bench.render({"chip": "x"}, [ours], [], [])
