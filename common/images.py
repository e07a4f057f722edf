"""Open an image the way both official pipelines do: EXIF orientation applied, then plain RGB.

Exact to DeepSeek-OCR's `modeling_deepseekocr.py` `load_image` + `load_pil_images` (PaddleOCR-VL's processor
also ends in `.convert("RGB")`): `Image.open` -> `ImageOps.exif_transpose`, falling back to the untransposed
image when that raises -> `.convert("RGB")`. Alpha is dropped, not composited (transparent pixels show their
stored colour), palettes are expanded and grayscale is replicated, as `convert` does.
Every later resize must happen on the RGB result: resizing a palette image first would use NEAREST.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

#: The only formats Pillow may try. Its other plugins include PostScript/EPS (decoded by running Ghostscript, an
#: external interpreter) and rarely used parsers; a file or upload in any of those is refused as not an image.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"image data ({len(source)} bytes)"
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)}"
    return "image stream"


def _open(source: ImageSource) -> Image.Image:
    """`Image.open` with every failure turned into one clear `ImageError` line."""
    what = _describe(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(bytes(source)), formats=ALLOWED_FORMATS)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{what} not found" if not path.exists() else f"{what} is not a file")
            return Image.open(path, formats=ALLOWED_FORMATS)
        return Image.open(source, formats=ALLOWED_FORMATS)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is too large to decode ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not in a supported image format ({', '.join(ALLOWED_FORMATS)})") from None
    except OSError as exc:
        raise ImageError(f"cannot read {what}: {exc}") from None


@contextlib.contextmanager
def quiet_size_warning() -> Iterator[None]:
    """Pillow's DecompressionBombWarning silenced: an image between its warning size and its error size (2x) is
    allowed here, and a raw Python warning is no message for the user; the error above it stays an `ImageError`.

    `catch_warnings` swaps process-wide filters: with threads decoding at once, the worst case is that this one
    filter outlives the block, which is the behaviour wanted anyway.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_image(source: ImageSource) -> Image.Image:
    """Decode a path, bytes or binary stream into a fully loaded RGB image, orientation applied.

    Raises `ImageError` (a `UserError`) for a missing path, undecodable or truncated data, a format outside
    `ALLOWED_FORMATS`, or an image over Pillow's decompression-bomb limit. Large images under that limit decode
    without Pillow's warning (`quiet_size_warning`).
    """
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        source = source.read()  # a stream is read once, so the fallback below can open it again
    with quiet_size_warning():
        return _decode(source)


def _decode(source: ImageSource) -> Image.Image:
    image = _open(source)
    try:
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{_describe(source)} is too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the official loader falls back to the plain image on any error
        log.debug("EXIF orientation not applied to %s: %s", _describe(source), exc)
        image = _open(source)
    return to_rgb(image, _describe(source))


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """`image.convert("RGB")` (alpha dropped, palette expanded, gray replicated), decode errors as `ImageError`.

    For images already in memory (PDF renders, test images): no EXIF step, as the official code applies
    orientation only when it opens a file.
    """
    try:
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is too large to decode ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode {what}: {exc}") from None
