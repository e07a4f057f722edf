"""common/tokenizer.py against the REAL DeepSeek-OCR tokenizer (ids checked by hand against the published vocab)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ModelFilesError
from common.tokenizer import IncrementalDecoder, Tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "deepseek-ocr"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_files(REFERENCE / "tokenizer.json", REFERENCE / "tokenizer_config.json")


def test_special_tokens_are_single_ids_and_keep_spaces(tok: Tokenizer) -> None:
    assert tok.encode("Locate <|ref|>") == [26751, 434, 223, 128816]
    assert tok.encode("\n") == [201]
    assert tok.encode("<image>\n<|grounding|>Convert") == [128815, 201, 128820, 21842]


def test_encode_adds_no_bos(tok: Tokenizer) -> None:
    ids = tok.encode("hello")
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_bos_eos_from_config(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.id_to_token(0) == "<｜begin▁of▁sentence｜>"
    assert tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    assert tok.vocab_size == 128827


def test_bos_eos_from_special_tokens_map_only(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((REFERENCE / "tokenizer.json").read_bytes())
    (tmp_path / "special_tokens_map.json").write_bytes((REFERENCE / "special_tokens_map.json").read_bytes())
    t = Tokenizer.from_files(tmp_path / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (0, 1)


def test_no_config_leaves_bos_eos_unknown(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((REFERENCE / "tokenizer.json").read_bytes())
    t = Tokenizer.from_files(tmp_path / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (None, None)


def test_missing_and_corrupt_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError, match="not found"):
        Tokenizer.from_files(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFilesError, match="cannot parse"):
        Tokenizer.from_files(tmp_path / "tokenizer.json")


def test_unknown_bos_token_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((REFERENCE / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ModelFilesError, match="<nope>"):
        Tokenizer.from_files(tmp_path / "tokenizer.json")


def test_decode_round_trip_and_skip_special(tok: Tokenizer) -> None:
    text = "<|ref|>Table 1<|/ref|>\n价格 ≥ 5 €"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([0, *ids, 1], skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert "<｜begin▁of▁sentence｜>" in tok.decode([0, *ids])


def _stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", ["你好世界😀 and 🤖🧪 done", "中文：表格 | 列 |\n\n## 標題 🎉", "plain ascii text."])
def test_incremental_decoder_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok.incremental_decoder(), ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_holds_back_split_emoji(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) >= 2, "the emoji must span several byte-level tokens for this test to mean anything"
    decoder = tok.incremental_decoder()
    assert [decoder.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.feed(ids[-1]) == "😀"


def test_incremental_decoder_skip_special(tok: Tokenizer) -> None:
    ids = [*tok.encode("<|ref|>x<|/ref|> y"), tok.eos_id]
    pieces = _stream(tok.incremental_decoder(skip_special_tokens=True), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "x y"


def test_flush_releases_truncated_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok😀")[:-1]  # the stream ends mid-character
    decoder = tok.incremental_decoder()
    pieces = _stream(decoder, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_incremental_decoder_on_sentencepiece_style_tokenizer() -> None:
    """Metaspace decoders drop the first token's leading space: the window must reproduce exactly that."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁": 4}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    t = Tokenizer(hf)
    for ids, text in (([1, 2, 3, 4, 1], "Hello world!  Hello"), ([4, 1, 2], " Hello world")):
        pieces = _stream(t.incremental_decoder(), ids)
        assert "".join(pieces) == t.decode(ids) == text


def test_incremental_decoder_on_byte_fallback_tokenizer() -> None:
    """Llama/ERNIE-style SentencePiece decoding: byte-fallback pieces and one stripped leading space."""
    from tokenizers import Tokenizer as HF, decoders, models

    vocab = {"<unk>": 0, "▁Hello": 1, "<0xE4>": 2, "<0xBD>": 3, "<0xA0>": 4, "▁world": 5, "!": 6}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    t = Tokenizer(hf)
    ids = [1, 2, 3, 4, 5, 2, 3, 4, 6]
    decoder = t.incremental_decoder()
    pieces = [decoder.feed(i) for i in ids] + [decoder.flush()]
    assert pieces == ["Hello", "", "", "你", " world", "", "", "你", "!", ""]
    assert "".join(pieces) == t.decode(ids) == "Hello你 world你!"
