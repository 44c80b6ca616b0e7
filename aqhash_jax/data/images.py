"""Image decoding, colour conversion, crops and the load-time readability scan.

All functions work on encoded bytes or file paths and return 8-bit RGB arrays of shape
[H, W, 3]. Crop boxes are in the coordinates of the stored image, as (left, top, right,
bottom) floats, which is the `box` convention of `PIL.Image.resize`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[bytes, str, os.PathLike]
Box = tuple[float, float, float, float]

# Errors that PIL raises for unreadable, truncated or hostile input. `SyntaxError` comes
# from some plugin parsers and `Image.DecompressionBombError` from images over PIL's pixel
# limit.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# File name endings that image-folder and list sources treat as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_EXIF_ORIENTATION_TAG = 0x0112

# Background used when an image with an alpha channel is flattened to RGB.
_ALPHA_BACKGROUND = (255, 255, 255)

# A JPEG whose last bytes lack the end-of-image marker is decoded in full by the quick
# scan, because trailing padding or metadata after the marker is legal.
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL_BYTES = 64


class ImageDecodeError(ValueError):
    """Raised when an image cannot be decoded; the message names the image."""


def open_image(data: ImageInput) -> Image.Image:
    """Open an image lazily (header only) from encoded bytes or a file path."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(data)))
    return Image.open(os.fspath(data))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any common mode to 8-bit RGB.

    Greyscale ("L", "1") is replicated to three channels. Images with alpha ("RGBA", "LA",
    "PA", and "P" with a transparency entry) are composited on white. CMYK, YCbCr, LAB and
    HSV go through PIL's converters. 16-bit greyscale ("I;16", "I;16B", "I;16L") keeps the
    high byte, the same reduction PIL applies to 16-bit RGB PNGs. 32-bit integer ("I") and
    float ("F") images are taken as values on the [0, 255] scale and clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image

    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image

    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")

    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint16)
        grey = (values >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")

    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")

    return image.convert("RGB")


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except DECODE_ERRORS:
        return 1


def _apply_orientation(pixels: Image.Image, orientation: int) -> Image.Image:
    transposes = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_270],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_90],
    }
    for method in transposes.get(orientation, []):
        pixels = pixels.transpose(method)
    return pixels


def image_size(data: ImageInput) -> tuple[int, int]:
    """Return (width, height) from the image header without decoding the pixels."""
    with open_image(data) as image:
        return image.size


def decode_crop(
    data: ImageInput,
    box: Box | Callable[[int, int], Box] | None,
    output_size: int,
    *,
    name: str = "<bytes>",
) -> np.ndarray:
    """Decode the region `box` of an image and resize it to a square.

    Args:
      data: encoded image bytes or a file path.
      box: (left, top, right, bottom) in stored-image pixels; a callable taking the stored
        (width, height) and returning the box; or None for the whole image.
      output_size: side of the output square in pixels.
      name: how error messages refer to the image.

    Returns:
      uint8 [output_size, output_size, 3] RGB pixels. The EXIF orientation is applied to
      the output square, which gives the same pixels as cropping the oriented image for a
      centred box and the same distribution for random boxes drawn symmetrically.

    Raises:
      ImageDecodeError: the bytes are not a decodable image (corrupt, truncated, not an
        image, or over PIL's pixel limit).

    Big JPEGs are decoded at a reduced scale (`Image.draft`) when the crop still covers at
    least `output_size` pixels at that scale, which cuts decode time roughly by the square
    of the reduction.
    """
    if output_size <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")

    try:
        with open_image(data) as image:
            width, height = image.size
            if box is None:
                box = (0.0, 0.0, float(width), float(height))
            elif callable(box):
                box = box(width, height)
            left, top, right, bottom = box
            crop_width = right - left
            crop_height = bottom - top
            if crop_width <= 0 or crop_height <= 0:
                raise ValueError(f"empty crop box {box} for image {name} of size {image.size}")

            # Ask for the smallest stored size that still leaves the crop at least
            # `output_size` pixels on each side; PIL picks a JPEG scale of 1/2, 1/4 or 1/8
            # that is no smaller than the request and leaves other formats unchanged.
            scale = max(output_size / crop_width, output_size / crop_height)
            if scale < 0.5 and image.format == "JPEG":
                request = (
                    max(1, math.ceil(width * scale)),
                    max(1, math.ceil(height * scale)),
                )
                image.draft("RGB", request)
            reduced_width, reduced_height = image.size
            factor_x = reduced_width / width
            factor_y = reduced_height / height
            reduced_box = (left * factor_x, top * factor_y, right * factor_x, bottom * factor_y)

            orientation = _exif_orientation(image)
            image.load()
            rgb = to_rgb(image)
            square = rgb.resize(
                (output_size, output_size),
                resample=Image.Resampling.BILINEAR,
                box=reduced_box,
            )
            square = _apply_orientation(square, orientation)
            pixels = np.asarray(square, dtype=np.uint8)
    except DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image {name}: {error}") from error

    if pixels.shape != (output_size, output_size, 3):
        raise ImageDecodeError(
            f"decoded image {name} has shape {pixels.shape}, expected "
            f"({output_size}, {output_size}, 3)"
        )
    return pixels


def decode_rgb(data: ImageInput, *, name: str = "<bytes>") -> np.ndarray:
    """Decode a whole image to uint8 [H, W, 3] RGB at its stored size, EXIF-oriented."""
    try:
        with open_image(data) as image:
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
            return np.asarray(rgb, dtype=np.uint8).copy()
    except DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image {name}: {error}") from error


def center_crop_box(
    width: int, height: int, image_size: int, resize_size: int
) -> tuple[float, float, float, float]:
    """Return the box that "resize shorter side to resize_size, centre crop image_size" takes.

    The box is in stored-image pixels, so one `resize(box=...)` call does both steps.
    """
    if image_size > resize_size:
        raise ValueError(
            f"image_size {image_size} is larger than resize_size {resize_size}; the centre "
            "crop must fit inside the resized image, so set resize_size >= image_size"
        )
    scale = resize_size / min(width, height)
    side = image_size / scale
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[float, float, float, float]:
    """Draw a crop box covering a random area fraction and aspect ratio of the image.

    The area fraction is uniform in `scale` and the aspect ratio (width / height) is
    log-uniform in `ratio`. When no draw fits inside the image after `attempts` tries, the
    box is the largest centred box whose aspect ratio is clipped to `ratio`.
    """
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")

    area = float(width * height)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = math.sqrt(target_area * aspect)
        crop_height = math.sqrt(target_area / aspect)
        if crop_width <= width and crop_height <= height:
            left = rng.uniform(0.0, width - crop_width)
            top = rng.uniform(0.0, height - crop_height)
            return (left, top, left + crop_width, top + crop_height)

    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = float(width), width / ratio[0]
    elif image_ratio > ratio[1]:
        crop_width, crop_height = height * ratio[1], float(height)
    else:
        crop_width, crop_height = float(width), float(height)
    left = (width - crop_width) / 2.0
    top = (height - crop_height) / 2.0
    return (left, top, left + crop_width, top + crop_height)


@dataclasses.dataclass(frozen=True)
class UnreadableImage:
    """A file the readability scan rejected, with the reason."""

    path: str
    reason: str


def _jpeg_has_end_marker(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - _JPEG_TAIL_BYTES))
        tail = handle.read()
    return _JPEG_EOI in tail.rstrip(b"\x00")


def check_image(path: str, *, full_decode: bool = False) -> str | None:
    """Check that a file is a readable image; return None, or the reason it is not.

    The quick check opens the header, runs `Image.verify` (which checks chunk CRCs for PNG)
    and, for JPEG, looks for the end-of-image marker in the last bytes, decoding the whole
    file only when the marker is missing. `full_decode=True` decodes every file.
    """
    try:
        with Image.open(path) as image:
            image_format = image.format
            image.verify()
        needs_decode = full_decode
        if image_format == "JPEG" and not needs_decode:
            needs_decode = not _jpeg_has_end_marker(path)
        if needs_decode:
            with Image.open(path) as image:
                image.load()
    except DECODE_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


def scan_images(
    paths: Sequence[str], *, full_decode: bool = False, num_threads: int = 8
) -> list[UnreadableImage]:
    """Check many files in parallel threads; return the unreadable ones in input order.

    NOTE: the quick scan (full_decode=False) can miss damage inside the entropy-coded data
    of a JPEG that still ends with its end-of-image marker, and damage inside formats whose
    `verify` reads only the header (BMP, GIF, WebP, TIFF). The loaders catch those at decode
    time and drop the row from the batch through its mask.
    """
    if num_threads <= 0:
        raise ValueError(f"num_threads must be positive, got {num_threads}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
        reasons = list(pool.map(lambda p: check_image(p, full_decode=full_decode), paths))
    return [
        UnreadableImage(path=str(path), reason=reason)
        for path, reason in zip(paths, reasons)
        if reason is not None
    ]
