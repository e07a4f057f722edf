"""What the front ends and the pipeline know about one model, in one object: the `ModelFamily` seam.

A family names its hub files, its config.json parser, its backend module, its own options (DeepSeek-OCR's size
presets, PaddleOCR-VL's tasks), its default prompt and how a prompt gets image placeholders, its generation
defaults, the side files it reads at load time, and how a prompt and images become model inputs. Everything
model-specific outside `common/models/` lives in per-model files (`common/<model>.py`, `<backend>/<model>.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from PIL import Image

from ..errors import ModelFilesError, UserError
from ..generation import PromptInputs
from ..prompts import IMAGE_PLACEHOLDER, check_placeholders
from ..sampling import SamplingOptions


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
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "processor_config.json",
)


@dataclass(frozen=True)
class ModelOption:
    """An [inference] key that only one family understands (e.g. `mode`, `task`).

    `presets` maps a choice to the values of other keys it stands for (`mode = "tiny"` sets base_size,
    image_size and crop_mode); such keys may not be given beside the option on one command line or request.
    """

    name: str
    choices: tuple[str, ...]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def replaces(self) -> tuple[str, ...]:
        """The keys a preset of this option sets (empty when it has no presets)."""
        return tuple(dict.fromkeys(key for preset in self.presets.values() for key in preset))


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ModelFiles(Protocol):
    """The snapshot files a family may read at load time (`common.assets.ModelFiles`)."""

    directory: Path
    config: Path
    preprocessor_config: Path | None
    generation_config: Path | None
    chat_template: Path | None


class ModelFamily:
    """One model as the rest of the project sees it. Subclasses set the class attributes and override the
    methods whose base behaviour does not fit; an instance holds no state, so one is shared by every caller.
    """

    id: str                                  # "deepseek-ocr": what --model, config.toml and the server use
    display_name: str                        # "DeepSeek-OCR": shown by the server and in messages
    spec: ModelSpec                          # hub repository and files
    config_class: type                       # frozen dataclass parsed from config.json (`from_file`)
    module: str                              # backend module name: torch_ocr.<module>, mlx_ocr.<module>
    checkpoint_builder: str                  # module with build(out, *, size, seed, dtype): tiny checkpoints
    model_types: tuple[str, ...]             # config.json `model_type` values (prefixes) of this family
    options: tuple[ModelOption, ...] = ()    # [inference] keys only this family understands
    default_prompt: str = ""                 # one image's prompt when only images are given
    placeholders_required: bool = True       # every image needs its <image>; False: images without one go first

    # -------------------------------------------------------------------------------------- identity
    def __repr__(self) -> str:
        return f"<ModelFamily {self.id}>"

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def matches_model_type(self, model_type: str) -> bool:
        """True when config.json's `model_type` is one of this family's (exact or as a prefix)."""
        return any(model_type == name or model_type.startswith(name) for name in self.model_types)

    def matches_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a config.json whose `model_type` matched is this family's: True unless two families share a
        model_type (DeepSeek-OCR and DeepSeek-OCR-2 both say "deepseek_vl_v2") and the rest must tell them apart."""
        return True

    # -------------------------------------------------------------------------------------- load time
    def max_positions(self, config_path: Path) -> int:
        """The decoder's context length from config.json (the KV cache is sized from it per request)."""
        raise NotImplementedError

    def load_extras(self, files: ModelFiles) -> dict[str, Any]:
        """Side files `prepare` needs, read once when the model loads (none by default)."""
        return {}

    def generation_defaults(self, generation_config: Mapping[str, Any]) -> SamplingOptions:
        """The sampling rules of this model when the user sets none (generation_config.json's dict given)."""
        return SamplingOptions()

    # -------------------------------------------------------------------------------------- prompts
    def user_prompt(self, prompt: str | None, n_images: int, options: Mapping[str, Any], *,
                    param: str | None = None) -> str:
        """The prompt a CLI or API call sends for `n_images` images: the default prompt when `prompt` is None,
        else `prompt` checked against the images. `options` are this call's family options (e.g. `task`).
        Raises `UserError` (with `param`) for a prompt that cannot go with the images."""
        if prompt is None:
            if not n_images:
                raise UserError("nothing to do: give images, a prompt, or both", param=param)
            return self.default_prompt_for(n_images)
        if self.placeholders_required or IMAGE_PLACEHOLDER in prompt:
            check_placeholders(prompt, n_images, param=param)
        return prompt

    def default_prompt_for(self, n_images: int) -> str:
        """`default_prompt` for `n_images` images (the base prompt has no placeholders to multiply)."""
        return self.default_prompt

    def render_prompt(self, prompt: str, settings: Any) -> str:
        """The front end's prompt text as this model's tokenizer-side prompt (timed as prompt.render)."""
        return prompt

    def prepare(self, prompt: str, images: Sequence[Image.Image], encoder: Encoder, settings: Any,
                extras: Mapping[str, Any]) -> PromptInputs:
        """A rendered prompt and RGB images -> the model's inputs (NumPy), with `settings` the request's
        `InferenceSettings` and `extras` what `load_extras` read."""
        raise NotImplementedError


def read_json(path: Path | None) -> dict[str, Any]:
    """A side file's JSON object ({} when the snapshot has none); unreadable files are `ModelFilesError`s."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {Path(path).name}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{Path(path).name} is not a JSON object")
    return data
