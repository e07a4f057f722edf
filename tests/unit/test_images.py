"""common.images: the official open -> exif_transpose (with fallback) -> RGB path, and its error messages."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from common import images
from common.errors import ImageError, UserError
from common.images import open_image, to_rgb

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def quadrants(width: int = 64, height: int = 32) -> Image.Image:
    """Red top-left, blue top-right, green bottom half: orientation is readable even after JPEG loss."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2, : width // 2] = RED
    arr[: height // 2, width // 2:] = BLUE
    arr[height // 2:] = GREEN
    return Image.fromarray(arr)


def jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    quadrants().save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def colour_at(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    """The nearest of the three block colours at a pixel (JPEG shifts values a little)."""
    pixel = np.asarray(image)[y, x].astype(int)
    return min((RED, BLUE, GREEN), key=lambda c: int(np.abs(pixel - np.array(c)).sum()))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_plain_rgb_from_path_bytes_and_stream(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    path.write_bytes(png(quadrants()))
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        image = open_image(source)
        assert image.mode == "RGB" and image.size == (64, 32)
        assert np.array_equal(np.asarray(image), np.asarray(quadrants()))


@pytest.mark.parametrize("orientation,size,top_left,top_right", [
    (1, (64, 32), RED, BLUE),
    (2, (64, 32), BLUE, RED),      # mirrored left-right
    (3, (64, 32), GREEN, GREEN),   # rotated 180: the green half is on top
    (6, (32, 64), GREEN, RED),     # rotated 90 clockwise when shown: width and height swap
    (8, (32, 64), BLUE, GREEN),    # rotated 90 counter-clockwise
])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], top_left: tuple,
                                     top_right: tuple) -> None:
    image = open_image(jpeg_with_orientation(orientation))
    assert image.mode == "RGB" and image.size == size
    assert colour_at(image, 2, 2) == top_left
    assert colour_at(image, size[0] - 3, 2) == top_right


def test_exif_failure_falls_back_to_the_plain_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(image: Image.Image) -> Image.Image:
        raise ValueError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    image = open_image(jpeg_with_orientation(6))
    assert image.mode == "RGB" and image.size == (64, 32)  # orientation ignored, as in the official loader


def test_rgba_alpha_dropped_palette_expanded_gray_replicated() -> None:
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 0))       # fully transparent: the stored colour stays
    assert np.asarray(open_image(png(rgba))).tolist() == [[[10, 20, 30]] * 4] * 2
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(open_image(png(palette)))[0].tolist() == [[0, 0, 0], [200, 100, 50], [0, 0, 0]]
    gray = Image.new("L", (2, 2), 77)
    assert np.asarray(open_image(png(gray))).tolist() == [[[77, 77, 77]] * 2] * 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found") as info:
        open_image(tmp_path / "nope.png")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not a file"):
        open_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("just text")
    with pytest.raises(ImageError, match="not in a supported image format"):
        open_image(path)
    with pytest.raises(ImageError, match="image data"):
        open_image(b"\x00\x01garbage")


def test_truncated_image() -> None:
    data = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError):
        open_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above twice this
    with pytest.raises(ImageError, match="too large"):
        open_image(png(Image.new("RGB", (30, 30))))


@pytest.mark.parametrize("as_source", [bytes, io.BytesIO, "path"])
def test_large_but_allowed_images_give_no_python_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        as_source) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 pixels: over the warning size, under 2x
    data = png(Image.new("RGB", (12, 12)))
    if as_source == "path":
        source = tmp_path / "big.png"
        source.write_bytes(data)
    else:
        source = as_source(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert open_image(source).size == (12, 12)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow itself does warn on the same image
        Image.open(io.BytesIO(data))


def test_to_rgb_converts_in_memory_images_without_exif_step() -> None:
    image = to_rgb(Image.new("LA", (2, 1), (50, 0)))
    assert image.mode == "RGB" and np.asarray(image).tolist() == [[[50, 50, 50]] * 2]


def test_error_messages_name_the_source(tmp_path: Path) -> None:
    assert images._describe(b"abc") == "image data (3 bytes)"
    assert images._describe(tmp_path / "x.png").endswith("x.png")
