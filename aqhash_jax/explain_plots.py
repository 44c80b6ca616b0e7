"""Rendering of per-bit attention maps with PIL: heat overlays, labelled panel grids, a colour bar.

Every figure of the explain tool is a list of sections, each a heading above a row-major grid of
panels. A panel is an image square with an optional attention heat overlay and a few caption
lines. Heat values are in "times uniform" units: attention mass per pixel multiplied by the
number of pixels, so 1 means the attention of a uniform map and the colour bar of a figure spans
0 to the largest value in that figure.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of the heat colour map from low (dark violet) to high (pale yellow), RGB in [0, 255].
# Brightness rises monotonically, so the map also reads in greyscale.
HEAT_ANCHORS = np.array(
    [
        [0.00, 18, 10, 50],
        [0.25, 110, 25, 110],
        [0.50, 205, 60, 65],
        [0.75, 248, 150, 35],
        [1.00, 252, 245, 160],
    ],
    dtype=np.float64,
)
HEAT_ALPHA = 0.55

POSITIVE_COLOR = (25, 90, 200)
NEGATIVE_COLOR = (205, 85, 0)
TEXT_COLOR = (20, 20, 20)
MUTED_COLOR = (110, 110, 110)
BACKGROUND_COLOR = (255, 255, 255)
EMPTY_PANEL_COLOR = (235, 235, 235)

_MARGIN = 12
_GAP = 6
_GROUP_GAP = 22
_SIGN_BAR = 4
_COLORBAR_WIDTH = 18


@dataclasses.dataclass
class Panel:
    """One image square of a figure.

    Attributes:
      image: uint8 [P, P, 3] RGB, already at the figure's panel size.
      heat: float [P, P] attention in times-uniform units, or None for the plain image.
      captions: (text, RGB colour) lines drawn under the image.
      sign: +1 or -1 draws a bar of the sign's colour above the image; 0 draws none.
    """

    image: np.ndarray
    heat: np.ndarray | None = None
    captions: Sequence[tuple[str, tuple[int, int, int]]] = ()
    sign: int = 0


@dataclasses.dataclass
class Section:
    """A heading above a grid of panels.

    Attributes:
      heading: text above the grid; empty for none.
      panels: the panels in row-major order.
      columns: panels per row.
      group_size: a wider gap follows every `group_size` panels of a row (for example 2 keeps a
        query and a result panel together); 0 for equal gaps.
    """

    heading: str
    panels: Sequence[Panel]
    columns: int
    group_size: int = 0


def load_font(size: int) -> ImageFont.ImageFont:
    """Return PIL's built-in scalable font at `size` pixels (a bitmap font without FreeType)."""
    return ImageFont.load_default(size=size)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to uint8 RGB [..., 3] along HEAT_ANCHORS."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(values, HEAT_ANCHORS[:, 0], HEAT_ANCHORS[:, channel]) for channel in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay_heat(image: np.ndarray, heat: np.ndarray, vmax: float, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """Blend the heat colours of `heat / vmax` over `image`.

    Args:
      image: uint8 [H, W, 3].
      heat: float [H, W], non-negative.
      vmax: heat value drawn with the top colour; must be positive.
      alpha: weight of the heat colour, constant over the image so the colour bar stays exact.

    Returns:
      uint8 [H, W, 3].
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}.")
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heat must have shape {image.shape[:2]} to match the image, got {heat.shape}.")
    if not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax}.")

    colors = heat_colors(heat / vmax).astype(np.float64)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colors
    return np.rint(blended).astype(np.uint8)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [H, W, 3] to uint8 [size, size, 3] with bicubic interpolation."""
    resized = Image.fromarray(image).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def sign_caption(bit: int, value: float) -> tuple[str, tuple[int, int, int]]:
    """Return the caption "bit k: +1 (h=+0.83)" of a continuous code value and its sign's colour."""
    positive = value >= 0.0
    text = f"bit {bit}: {'+1' if positive else '-1'} (h={value:+.2f})"
    return text, POSITIVE_COLOR if positive else NEGATIVE_COLOR


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _line_height(font) -> int:
    return _text_size(font, "Ag+-|")[1] + 4


def _section_layout(section: Section, panel_size: int) -> tuple[list[tuple[int, int]], int, int]:
    """Return each panel's offset (x, y) inside the grid, and the grid's width and height."""
    columns = max(1, section.columns)
    group = section.group_size
    offsets = []
    for index in range(len(section.panels)):
        row, column = divmod(index, columns)
        groups_before = column // group if group > 0 else 0
        x = column * (panel_size + _GAP) + groups_before * (_GROUP_GAP - _GAP)
        offsets.append((x, row))

    used_columns = min(columns, len(section.panels))
    last = used_columns - 1
    width = 0
    if used_columns > 0:
        width = last * (panel_size + _GAP) + (last // group if group > 0 else 0) * (_GROUP_GAP - _GAP) + panel_size
    rows = -(-len(section.panels) // columns)
    return offsets, width, rows


def render_figure(
    title: Sequence[str],
    sections: Sequence[Section],
    *,
    panel_size: int,
    vmax: float | None,
    colorbar_label: str = "attention (x uniform)",
    font_size: int = 13,
) -> Image.Image:
    """Draw a figure: title lines, then each section's heading and panel grid, and a colour bar.

    Args:
      title: lines at the top of the figure.
      sections: the sections, top to bottom.
      panel_size: side P of every panel image in pixels.
      vmax: heat value of the top colour, shared by all panels; None when no panel has heat,
        which leaves out the colour bar.
      colorbar_label: the colour bar's label.
      font_size: caption font size in pixels; headings are 2 pixels and titles 4 pixels larger.

    Returns:
      An RGB PIL image.
    """
    caption_font = load_font(font_size)
    heading_font = load_font(font_size + 2)
    title_font = load_font(font_size + 4)
    caption_height = _line_height(caption_font)
    max_captions = max((len(panel.captions) for section in sections for panel in section.panels), default=0)
    cell_height = _SIGN_BAR + panel_size + max_captions * caption_height + _GAP

    layouts = [_section_layout(section, panel_size) for section in sections]
    content_width = max([width for _, width, _ in layouts] + [1])
    title_width = max([_text_size(title_font, line)[0] for line in title] + [0])
    heading_width = max([_text_size(heading_font, section.heading)[0] for section in sections] + [0])
    colorbar_space = 0 if vmax is None else _COLORBAR_WIDTH + 130
    width = _MARGIN * 2 + max(content_width + colorbar_space, title_width, heading_width)

    title_height = len(title) * _line_height(title_font) + (_GAP if title else 0)
    heading_height = _line_height(heading_font)
    height = _MARGIN + title_height
    for section, (_, _, rows) in zip(sections, layouts):
        height += (heading_height if section.heading else 0) + rows * cell_height + _GAP
    height += _MARGIN
    colorbar_top = _MARGIN + title_height + heading_height
    colorbar_height = max(120, min(320, height - colorbar_top - _MARGIN - 10))
    colorbar_label_height = 6 + 2 * _line_height(caption_font)
    height = max(height, colorbar_top + colorbar_height + colorbar_label_height + _MARGIN)

    figure = Image.new("RGB", (width, height), BACKGROUND_COLOR)
    draw = ImageDraw.Draw(figure)

    y = _MARGIN
    for line in title:
        draw.text((_MARGIN, y), line, font=title_font, fill=TEXT_COLOR)
        y += _line_height(title_font)
    y += _GAP if title else 0

    for section, (offsets, _, rows) in zip(sections, layouts):
        if section.heading:
            draw.text((_MARGIN, y), section.heading, font=heading_font, fill=TEXT_COLOR)
            y += heading_height
        for panel, (x, row) in zip(section.panels, offsets):
            _draw_panel(figure, draw, panel, (_MARGIN + x, y + row * cell_height), panel_size, vmax, caption_font)
        y += rows * cell_height + _GAP

    if vmax is not None:
        left = _MARGIN + content_width + 70
        _draw_colorbar(draw, (left, colorbar_top), colorbar_height, vmax, colorbar_label, caption_font)
    return figure


def _draw_panel(figure, draw, panel: Panel, origin: tuple[int, int], panel_size: int, vmax, font) -> None:
    x, y = origin
    if panel.image.shape != (panel_size, panel_size, 3) or panel.image.dtype != np.uint8:
        raise ValueError(
            f"panel image must be uint8 [{panel_size}, {panel_size}, 3], got {panel.image.dtype} "
            f"{panel.image.shape}; resize it with resize_rgb."
        )
    if panel.sign != 0:
        color = POSITIVE_COLOR if panel.sign > 0 else NEGATIVE_COLOR
        draw.rectangle((x, y, x + panel_size - 1, y + _SIGN_BAR - 2), fill=color)

    pixels = panel.image
    if panel.heat is not None:
        if vmax is None:
            raise ValueError("a panel has a heat map but the figure has vmax=None; pass the largest heat value.")
        pixels = overlay_heat(pixels, panel.heat, vmax)
    figure.paste(Image.fromarray(pixels), (x, y + _SIGN_BAR))

    line_y = y + _SIGN_BAR + panel_size + 2
    for text, color in panel.captions:
        draw.text((x, line_y), _fit_text(font, text, panel_size), font=font, fill=color)
        line_y += _line_height(font)


def _fit_text(font, text: str, width: int) -> str:
    """Shorten `text` with a middle ellipsis until it fits `width` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 1
        head = (keep + 1) // 2
        shortened = text[:head] + "..." + text[len(text) - (keep - head):]
        if _text_size(font, shortened)[0] <= width:
            return shortened
    return text[:4]


def _draw_colorbar(draw, origin: tuple[int, int], height: int, vmax: float, label: str, font) -> None:
    left, top = origin
    values = np.linspace(1.0, 0.0, height)
    colors = heat_colors(values)
    for offset, color in enumerate(colors):
        draw.line((left, top + offset, left + _COLORBAR_WIDTH - 1, top + offset), fill=tuple(int(c) for c in color))
    draw.rectangle((left, top, left + _COLORBAR_WIDTH - 1, top + height - 1), outline=MUTED_COLOR)

    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        tick_y = top + int(round((1.0 - fraction) * (height - 1)))
        draw.line((left + _COLORBAR_WIDTH, tick_y, left + _COLORBAR_WIDTH + 4, tick_y), fill=TEXT_COLOR)
        text = f"{fraction * vmax:.2f}"
        text_height = _text_size(font, text)[1]
        draw.text((left + _COLORBAR_WIDTH + 7, tick_y - text_height // 2 - 1), text, font=font, fill=TEXT_COLOR)

    # Mark the level of evenly spread attention, the reference of the times-uniform unit.
    if 0.0 < 1.0 <= vmax:
        uniform_y = top + int(round((1.0 - 1.0 / vmax) * (height - 1)))
        draw.line((left - 5, uniform_y, left + _COLORBAR_WIDTH - 1, uniform_y), fill=TEXT_COLOR, width=2)
        text = "uniform"
        text_width, text_height = _text_size(font, text)
        draw.text((left - 8 - text_width, uniform_y - text_height // 2 - 1), text, font=font, fill=TEXT_COLOR)

    words = label.split(" ", 1)
    for index, word in enumerate(words):
        draw.text((left - 6, top + height + 6 + index * _line_height(font)), word, font=font, fill=TEXT_COLOR)


def _default_file_mode() -> int:
    """Return 0o666 minus the process umask; NamedTemporaryFile alone would leave mode 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_png(image: Image.Image, path: str | os.PathLike) -> str:
    """Write `image` as PNG to `path` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False)
    try:
        with handle:
            image.save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, _default_file_mode())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise
    return path
