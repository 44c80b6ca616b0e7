"""Contact sheets: one row per query, the query image followed by its results with captions."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from aqhash_jax.data import images as images_lib

_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (200, 200, 200)
_QUERY_FRAME = (40, 90, 200)
_TEXT = (0, 0, 0)
_MARGIN = 8
_CAPTION_LINES = 2
_LINE_HEIGHT = 12


@dataclasses.dataclass
class Tile:
    """One image of the sheet: a file path (None draws a placeholder) and up to two caption lines."""

    path: str | None
    caption: Sequence[str]


@dataclasses.dataclass
class SheetRow:
    """A query tile and its result tiles, nearest first."""

    query: Tile
    results: Sequence[Tile]


def _thumbnail(path: str | None, size: int) -> tuple[Image.Image, str | None]:
    """Return a size x size RGB tile with the image fitted and centred, and a note when it failed."""
    tile = Image.new("RGB", (size, size), _PLACEHOLDER)
    if path is None:
        return tile, "no image"
    try:
        with Image.open(path) as image:
            image.load()
            rgb = images_lib.to_rgb(ImageOps.exif_transpose(image))
            rgb.thumbnail((size, size), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        return tile, "missing"
    except images_lib.DECODE_ERRORS:
        return tile, "unreadable"
    tile.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    return tile, None


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten text from the left with "..." until it fits `width` pixels (paths keep their file name)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


def _save_atomic(image: Image.Image, out_path: str) -> None:
    extension = os.path.splitext(out_path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"sheet path {out_path} has no image file ending PIL can write; use .png or .jpg.")
    folder = os.path.dirname(os.path.abspath(out_path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out_path)}.", suffix=".tmp")
    os.close(handle)
    try:
        image.save(temporary, format=image_format)
        os.replace(temporary, out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def draw_contact_sheet(rows: Sequence[SheetRow], out_path: str | os.PathLike, *, thumb_size: int = 128) -> Image.Image:
    """Draw one row per query (query framed in blue, then its results) and write it to `out_path`.

    Unreadable or missing images become grey placeholders with a note in the caption. The image is
    written atomically in the format of the file ending, and returned.
    """
    if not rows:
        raise ValueError("no queries to draw; the contact sheet needs at least one row.")
    if thumb_size < 32:
        raise ValueError(f"thumb_size must be at least 32 pixels, got {thumb_size}.")
    out_path = os.fspath(out_path)
    font = ImageFont.load_default()
    columns = 1 + max(len(row.results) for row in rows)
    cell_width = thumb_size + _MARGIN
    cell_height = thumb_size + _CAPTION_LINES * _LINE_HEIGHT + _MARGIN
    # The query column is followed by a gap of one margin.
    width = _MARGIN + columns * cell_width + _MARGIN
    height = _MARGIN + len(rows) * cell_height
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    for row_index, row in enumerate(rows):
        top = _MARGIN + row_index * cell_height
        tiles = [row.query, *row.results]
        for column, tile in enumerate(tiles):
            left = _MARGIN + column * cell_width + (_MARGIN if column else 0)
            thumbnail, note = _thumbnail(tile.path, thumb_size)
            sheet.paste(thumbnail, (left, top))
            if column == 0:
                draw.rectangle((left - 2, top - 2, left + thumb_size + 1, top + thumb_size + 1), outline=_QUERY_FRAME, width=2)
            caption = list(tile.caption)[:_CAPTION_LINES]
            if note:
                # The first line (rank and distance) stays; the note takes the last line.
                caption = caption[: _CAPTION_LINES - 1] + [note]
            for line_index, line in enumerate(caption):
                text = _fit_text(draw, str(line), font, thumb_size)
                draw.text((left, top + thumb_size + 2 + line_index * _LINE_HEIGHT), text, fill=_TEXT, font=font)

    _save_atomic(sheet, out_path)
    return sheet


__all__ = ["SheetRow", "Tile", "draw_contact_sheet"]
