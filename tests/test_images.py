"""Tests for aqhash_jax.data.images: colour conversion, crops, decoding and the scan."""

import io

import numpy as np
import pytest
from PIL import Image

from aqhash_jax.data import images


def _encode(image: Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def _gradient_rgb(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    pixels = np.stack(
        [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), np.full((height, width), 90.0)],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def test_to_rgb_greyscale():
    grey = Image.new("L", (4, 3), 77)
    rgb = images.to_rgb(grey)
    assert rgb.mode == "RGB"
    assert np.all(np.asarray(rgb) == 77)


def test_to_rgb_rgba_composites_on_white():
    rgba = Image.new("RGBA", (2, 2), (200, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    pixels = np.asarray(images.to_rgb(rgba))
    assert tuple(pixels[0, 0]) == (10, 20, 30)
    assert tuple(pixels[1, 1]) == (255, 255, 255)


def test_to_rgb_palette_with_transparency():
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette_image.putpixel((1, 0), 1)
    palette_image.info["transparency"] = 0
    pixels = np.asarray(images.to_rgb(palette_image))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[0, 1]) == (0, 0, 255)


def test_to_rgb_16bit_keeps_high_byte():
    values = np.array([[0, 256, 65535, 32768]], dtype=np.uint16)
    decoded = Image.open(io.BytesIO(_encode(Image.fromarray(values), "PNG")))
    decoded.load()
    assert decoded.mode.startswith("I;16")
    pixels = np.asarray(images.to_rgb(decoded))
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_to_rgb_cmyk_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    decoded = Image.open(io.BytesIO(_encode(cmyk, "JPEG", quality=95)))
    decoded.load()
    red, green, blue = np.asarray(images.to_rgb(decoded))[4, 4].astype(int)
    assert red > 200
    assert green < 60
    assert blue < 60


def test_decode_crop_shape_and_dtype_per_mode():
    cases = {
        "rgb_jpeg": _encode(_gradient_rgb(40, 30), "JPEG"),
        "grey_jpeg": _encode(Image.new("L", (40, 30), 100), "JPEG"),
        "cmyk_jpeg": _encode(Image.new("CMYK", (40, 30), (0, 0, 0, 0)), "JPEG"),
        "rgba_png": _encode(Image.new("RGBA", (40, 30), (1, 2, 3, 128)), "PNG"),
        "i16_png": _encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        "palette_gif": _encode(Image.new("P", (40, 30), 3), "GIF"),
    }
    for name, data in cases.items():
        pixels = images.decode_crop(data, None, 16, name=name)
        assert pixels.shape == (16, 16, 3), name
        assert pixels.dtype == np.uint8, name


def test_decode_crop_rejects_bad_bytes():
    good = _encode(_gradient_rgb(64, 64), "JPEG")
    for data in (b"\x00\x01garbage" * 20, good[: len(good) // 2], b"just some text\n"):
        with pytest.raises(images.ImageDecodeError, match="cannot decode image bad.jpg"):
            images.decode_crop(data, None, 8, name="bad.jpg")


def test_decode_crop_box_selects_region():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    data = _encode(Image.fromarray(pixels), "PNG")
    left = images.decode_crop(data, (0, 0, 20, 20), 8)
    right = images.decode_crop(data, (20, 0, 40, 20), 8)
    # The resampling filter reads one source pixel past the box edge, so skip the edge column.
    assert left[:, :-1].max() == 0
    assert right[:, 1:].min() == 255


def test_decode_crop_draft_matches_full_decode():
    big = _gradient_rgb(1600, 1200)
    data = _encode(big, "JPEG", quality=95)
    box = images.center_crop_box(1600, 1200, 112, 128)
    reduced = images.decode_crop(data, box, 112).astype(np.float64)

    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = np.asarray(full.resize((112, 112), Image.Resampling.BILINEAR, box=box), dtype=np.float64)
    assert np.abs(reduced - reference).mean() < 3.0


def test_decode_crop_applies_exif_orientation():
    pixels = np.zeros((20, 20, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 3
    data = _encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = images.decode_crop(data, None, 20)
    assert decoded[:, :8].mean() < 30
    assert decoded[:, 12:].mean() > 225


def test_center_crop_box_geometry():
    box = images.center_crop_box(400, 200, 224, 256)
    side = 224 * 200 / 256
    np.testing.assert_allclose(box, (200 - side / 2, 100 - side / 2, 200 + side / 2, 100 + side / 2))


def test_center_crop_box_rejects_crop_larger_than_resize():
    with pytest.raises(ValueError, match="resize_size >= image_size"):
        images.center_crop_box(100, 100, 256, 224)


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = images.random_resized_crop_box(300, 200, rng, scale=(0.35, 1.0))
        assert 0 <= left < right <= 300 + 1e-6
        assert 0 <= top < bottom <= 200 + 1e-6
        area_fraction = (right - left) * (bottom - top) / (300 * 200)
        assert 0.35 - 1e-6 <= area_fraction <= 1.0 + 1e-6
        assert 0.75 - 1e-6 <= (right - left) / (bottom - top) <= 4 / 3 + 1e-6


def test_random_resized_crop_box_is_seeded():
    first = images.random_resized_crop_box(300, 200, np.random.default_rng(5))
    second = images.random_resized_crop_box(300, 200, np.random.default_rng(5))
    assert first == second


def test_random_resized_crop_box_fallback_clips_ratio():
    rng = np.random.default_rng(0)
    box = images.random_resized_crop_box(1000, 10, rng, scale=(0.9, 1.0), attempts=3)
    width, height = box[2] - box[0], box[3] - box[1]
    assert height == pytest.approx(10)
    assert width == pytest.approx(10 * 4 / 3)


def test_check_image_flags_each_bad_kind(tmp_path):
    good_jpeg = _encode(_gradient_rgb(64, 48), "JPEG")
    files = {
        "good.jpg": good_jpeg,
        "good.png": _encode(_gradient_rgb(16, 16), "PNG"),
        "corrupt.jpg": bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
        "truncated.jpg": good_jpeg[: len(good_jpeg) * 2 // 3],
        "text.jpg": b"this is a text file renamed to .jpg\n",
        "truncated.png": _encode(_gradient_rgb(64, 64), "PNG")[:-40],
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    for name in files:
        reason = images.check_image(str(tmp_path / name))
        if name.startswith("good"):
            assert reason is None, name
        else:
            assert reason is not None, name
    assert images.check_image(str(tmp_path / "missing.jpg")) is not None


def test_check_image_accepts_jpeg_with_trailing_bytes(tmp_path):
    path = tmp_path / "trailing.jpg"
    path.write_bytes(_encode(_gradient_rgb(32, 32), "JPEG") + b"\x00" * 10 + b"APPENDED-METADATA" * 10)
    assert images.check_image(str(path)) is None


def test_scan_images_returns_bad_in_order(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(b"not an image" if i in (1, 4) else _encode(_gradient_rgb(8, 8), "JPEG"))
        paths.append(str(path))
    bad = images.scan_images(paths, num_threads=3)
    assert [b.path for b in bad] == [paths[1], paths[4]]
    assert all(b.reason for b in bad)
    bad_full = images.scan_images(paths, full_decode=True, num_threads=2)
    assert [b.path for b in bad_full] == [paths[1], paths[4]]
