"""Known model ids, where each is published, and which of its files we need.

Both hubs host the same repositories under the same names, so one `repo` serves Hugging Face and ModelScope.
Only the files listed here are downloaded: the remote Python code, READMEs, assets and (for PaddleOCR-VL) the
PP-DocLayoutV2 layout model are not used by this project.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownModelError


@dataclass(frozen=True)
class ModelSpec:
    """One model: its hub repository and the files a run needs.

    `required` files must exist in the repository (a snapshot without them is broken); `optional` files are fetched
    when the repository has them. Both are exact paths in the repository, also used as download allow-patterns.
    """

    model_id: str
    repo: str                     # "owner/name" on both Hugging Face and ModelScope
    config: str                   # config.json
    tokenizer: str                # tokenizer.json (the `tokenizers` library format)
    weights: tuple[str, ...]      # safetensors shards; the first is the one handed to the loader
    optional: tuple[str, ...]     # side files: tokenizer config, preprocessor, generation config, chat template

    @property
    def required(self) -> tuple[str, ...]:
        return (self.config, self.tokenizer, *self.weights)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file worth downloading, required first."""
        return (*self.required, *self.optional)


# Optional names shared by both models; a repository lacking one simply has none to fetch.
_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "processor_config.json",
)

MODELS: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec(
            model_id="deepseek-ocr",
            repo="deepseek-ai/DeepSeek-OCR",
            config="config.json",
            tokenizer="tokenizer.json",
            weights=("model-00001-of-000001.safetensors",),
            # The index is tiny and lists every tensor; kept so the snapshot matches the published one.
            optional=("model.safetensors.index.json", *_SIDE_FILES),
        ),
        ModelSpec(
            model_id="paddleocr-vl",
            repo="PaddlePaddle/PaddleOCR-VL",
            config="config.json",
            tokenizer="tokenizer.json",
            weights=("model.safetensors",),
            # The SentencePiece model and added tokens are fetched too, in case a tokenizer.json must be rebuilt.
            optional=("tokenizer.model", "added_tokens.json", *_SIDE_FILES),
        ),
    )
}

MODEL_IDS: tuple[str, ...] = tuple(MODELS)


def get_model(model_id: str) -> ModelSpec:
    """The registry entry for `model_id`; an unknown id raises `UnknownModelError` listing the known ones."""
    try:
        return MODELS[model_id]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {model_id!r} (known: {', '.join(MODEL_IDS)})"
        ) from None
