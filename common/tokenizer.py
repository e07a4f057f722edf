"""The text side of both models: a thin wrapper over a Hugging Face `tokenizer.json`, plus streaming detokenization.

Prompts are assembled from pieces by `common/` (special ids are placed explicitly), so `encode` never adds special
tokens of its own; the official DeepSeek-OCR `infer()` likewise encodes text chunks with `add_special_tokens=False`
and inserts BOS and image tokens by id. `IncrementalDecoder` follows the prefix/read-offset scheme of the vLLM and
TGI detokenizers: decode a short window, emit what grew, hold back while the tail is an incomplete character.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelFilesError

# What `tokenizers` puts in place of bytes that do not (yet) form a whole UTF-8 character.
_REPLACEMENT = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read tokenizer file {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"tokenizer file {path.name} is not a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode text to ids and decode ids to text, with the BOS/EOS ids the checkpoint declares."""

    def __init__(self, tokenizer: _HFTokenizer, bos_id: int | None = None, eos_id: int | None = None) -> None:
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._special_ids = frozenset(
            int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)

    @classmethod
    def from_files(cls, tokenizer_json: Path | str, tokenizer_config: Path | str | None = None) -> Tokenizer:
        """Load `tokenizer.json`; BOS/EOS come from `tokenizer_config` (default: the sibling tokenizer_config.json)
        and then the sibling special_tokens_map.json, whichever names them first. Missing files raise
        `ModelFilesError`; a config naming no BOS/EOS leaves them None."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise ModelFilesError(f"tokenizer file not found: {path.name}")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelFilesError(f"cannot parse tokenizer file {path.name}: {exc}") from exc
        sources: list[dict[str, Any]] = []
        if tokenizer_config is not None:
            config_path = Path(tokenizer_config)
            if not config_path.is_file():
                raise ModelFilesError(f"tokenizer config not found: {config_path.name}")
            sources.append(_read_json(config_path))
        elif (path.parent / "tokenizer_config.json").is_file():
            sources.append(_read_json(path.parent / "tokenizer_config.json"))
        if (path.parent / "special_tokens_map.json").is_file():
            sources.append(_read_json(path.parent / "special_tokens_map.json"))
        ids = {}
        for role in ("bos_token", "eos_token"):
            for source in sources:
                content = _token_content(source.get(role))
                if content is not None:
                    token_id = hf.token_to_id(content)
                    if token_id is None:
                        raise ModelFilesError(f"{role} {content!r} is not in the vocabulary of {path.name}")
                    ids[role] = token_id
                    break
        return cls(hf, bos_id=ids.get("bos_token"), eos_id=ids.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (may be below the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of added tokens flagged special (what `skip_special_tokens` removes)."""
        return self._special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS or template added; special-token strings map to their single id."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of ids into text pieces whose concatenation is `decode(all_ids)`.

    Each `feed` decodes only the ids since the last emitted piece plus the ids before it (the "prefix"), because
    decoders are context-dependent: SentencePiece drops the leading space of the first token, and byte-level BPE
    splits one character over several tokens. A piece ending in U+FFFD is held back until the character completes;
    `flush` releases whatever is still held (a genuine U+FFFD, or a truncated character at the end).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window that is decoded but not emitted again
        self._read_offset = 0    # ids before this are already emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly completed text (often '', never a broken character)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back at the end of the stream (call once, after the last `feed`)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]
