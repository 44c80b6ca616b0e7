"""Show what each bit of a trained model looks at, and which bits are unused or duplicated.

Usage:
  python -m aqhash_jax.explain --workdir DIR --out OUT/ [--images IMG ...] \\
      [--query Q --result R] [--database-limit N] [--scale combined|finest]

Each bit of the code is produced by one learned query that cross-attends to the image tokens, so
the bit's attention map shows the image region that decides it. The command writes to OUT/:
- `image_NN_<name>.png` for each `--images` file: one panel per bit with the bit's value (+1/-1
  and the continuous value h) and its attention map over the evaluation-preprocessed image;
- `bit_NN.png` for each bit: the database images that set the bit most strongly to +1 and to -1,
  each with that bit's attention map, and `bits_overview.png` with one row per bit;
- `pair_<query>_<result>.png` with `--query` and `--result`: the bits on which the two codes agree
  and differ, with both attention maps side by side;
- `bit_stats.json`: per-bit balance, entropy and correlation of the exported database codes, with
  unused and duplicated bits flagged (see `aqhash_jax.bit_stats`); also printed on the console.

The exported code files hold signs only, so the continuous values of the database images are
recomputed with the model from the image paths in the database sidecar (`--database-limit`
samples a subset for speed; 0 skips the bit figures).

Attention maps. The tokens are the concatenation of the scales' grids in row-major order (CNN
backbones: the stride-16 grid, then the stride-32 grid; ViT: the patch grid). Each scale's
weights are divided by the pixel area of a grid cell, upsampled bilinearly to the image and
summed over scales ("combined"), so a map is an attention density over pixels that sums to one.
"finest" shows the scale with the most tokens alone. Maps are drawn in "times uniform" units
(density times the number of pixels), so 1 is the level of evenly spread attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import skimage.transform
from absl import logging

from aqhash_jax import bit_stats
from aqhash_jax import explain_plots as plots
from aqhash_jax.data.images import ImageDecodeError, center_crop_box, decode_crop
from aqhash_jax.models.backbones import input_normalization
from aqhash_jax.models.heads import select_feature_maps
from aqhash_jax.retrieval.codes import sign_codes
from aqhash_jax.retrieval.export import load_codes
from aqhash_jax.training.export import EXPORT_DIR, load_trained_model

SCALES = ("combined", "finest")
DATABASE_CODES_FILE = "database_codes.npy"
BIT_STATS_FILE = "bit_stats.json"
USAGE_ERROR = 2


class InputError(ValueError):
    """Invalid command-line input, reported as one line with exit status 2."""


# ---------------------------------------------------------------------------------------------
# Attention maps (numpy)
# ---------------------------------------------------------------------------------------------


def attention_maps(
    attention: np.ndarray,
    grid_shapes: Sequence[tuple[int, int]],
    output_shape: tuple[int, int],
    scale: str = "combined",
) -> np.ndarray:
    """Map per-bit attention over tokens to attention densities over image pixels.

    Args:
      attention: float [..., T] attention weights over the T image tokens, each row summing to 1.
      grid_shapes: (h_i, w_i) of each scale in token order, with sum(h_i * w_i) = T.
      output_shape: (H, W) of the output maps in pixels.
      scale: "combined" sums the upsampled densities of all scales, so each map sums to 1 over
        the pixels; "finest" keeps the scale with the most tokens, whose map sums to the share
        of attention that this scale receives.

    Returns:
      float32 [..., H, W]. A token's weight is spread over the pixels of its grid cell by
      bilinear upsampling and rescaled so that the map of each scale keeps the exact mass of its
      tokens.
    """
    attention = np.asarray(attention)
    if not np.issubdtype(attention.dtype, np.floating):
        raise ValueError(f"attention must be a float array, got dtype {attention.dtype}.")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}.")
    token_counts = [int(h) * int(w) for h, w in grid_shapes]
    if attention.ndim < 1 or attention.shape[-1] != sum(token_counts):
        raise ValueError(
            f"attention has shape {attention.shape}, but the grids {list(grid_shapes)} have "
            f"{sum(token_counts)} tokens; pass the grid shapes of the backbone that produced it."
        )
    height, width = (int(side) for side in output_shape)
    if height < 1 or width < 1:
        raise ValueError(f"output_shape must be positive, got {output_shape}.")

    # NOTE: each grid is stretched over the whole image. When the image side is not a multiple of
    # a scale's stride (208 px gives a 7-cell stride-32 grid that covers 224 px), cells are drawn up
    # to half a stride away from their receptive-field centres.
    leading = attention.shape[:-1]
    flat = attention.reshape(-1, attention.shape[-1]).astype(np.float64)
    selected = range(len(grid_shapes))
    if scale == "finest":
        selected = [int(np.argmax(token_counts))]

    starts = np.concatenate([[0], np.cumsum(token_counts)])
    total = np.zeros((flat.shape[0], height, width), dtype=np.float64)
    for index in selected:
        grid_height, grid_width = grid_shapes[index]
        weights = flat[:, starts[index]:starts[index + 1]]
        grid = weights.reshape(-1, grid_height, grid_width).transpose(1, 2, 0)

        upsampled = skimage.transform.resize(
            grid, (height, width, grid.shape[-1]), order=1, mode="edge", anti_aliasing=False
        ).transpose(2, 0, 1)
        # Bilinear upsampling keeps the mean only approximately near the borders, so each map is
        # rescaled to the exact attention mass of this scale's tokens.
        mass = weights.sum(axis=-1)
        upsampled_mass = upsampled.sum(axis=(1, 2))
        factor = np.divide(mass, upsampled_mass, out=np.zeros_like(mass), where=upsampled_mass > 0)
        total += upsampled * factor[:, None, None]

    return total.reshape(leading + (height, width)).astype(np.float32)


def times_uniform(maps: np.ndarray) -> np.ndarray:
    """Return densities [..., H, W] multiplied by H * W, so that a uniform map is 1 everywhere."""
    return maps * np.float32(maps.shape[-1] * maps.shape[-2])


def select_exemplars(codes: np.ndarray, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return, per bit, the rows that set the bit most strongly to +1 and to -1.

    Args:
      codes: float [n, K] continuous codes h in (-1, 1); sign(h) is the bit (h = 0 counts as +1,
        as in `sign_codes`).
      count: rows per bit and sign.

    Returns:
      (positive, negative): K int64 arrays each. positive[k] holds up to `count` rows with
      h_k >= 0 in order of decreasing h_k; negative[k] up to `count` rows with h_k < 0 in order
      of increasing h_k. Fewer rows are returned when fewer rows have that sign.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.floating):
        raise ValueError(f"codes must be float [n, K], got {codes.dtype} {codes.shape}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")

    positive, negative = [], []
    for bit in range(codes.shape[1]):
        values = codes[:, bit]
        order = np.argsort(-values, kind="stable")
        positive.append(order[values[order] >= 0][:count])
        order = np.argsort(values, kind="stable")
        negative.append(order[values[order] < 0][:count])
    return positive, negative


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _backbone_feature_maps(module, images):
    return module.backbone(images, train=False)["feature_maps"]


@dataclasses.dataclass
class Explainer:
    """A trained model with its evaluation preprocessing, for codes and attention maps.

    Attributes:
      model: the `HashModel`.
      variables: its inference variables {"params", "batch_stats"}.
      image_size: side of the network input in pixels.
      resize_size: shorter side before the centre crop, as in evaluation.
      batch_size: images per forward pass; the last batch is padded so one compilation serves all.
    """

    model: Any
    variables: Any
    image_size: int
    resize_size: int
    batch_size: int = 32

    def __post_init__(self):
        if self.model.backbone_name is None:
            raise ValueError("the model has no backbone, so it cannot encode images; export a full HashModel.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        self.mean, self.std = input_normalization(self.model.backbone_name)
        self.code_length = int(self.model.code_length)

        @jax.jit
        def forward(variables, images):
            outputs = self.model.apply(variables, images, train=False, return_attention=True)
            return outputs["codes"], outputs["attention"]

        self._forward = forward
        probe = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        feature_maps = jax.eval_shape(
            lambda variables, images: self.model.apply(variables, images, method=_backbone_feature_maps),
            self.variables,
            probe,
        )
        feature_maps = select_feature_maps(feature_maps, self.model.feature_maps)
        self.grid_shapes = [tuple(int(side) for side in feature_map.shape[1:3]) for feature_map in feature_maps]

    @classmethod
    def from_workdir(cls, workdir: str, batch_size: int = 32) -> "Explainer":
        """Load the exported model of a finished run and its evaluation image sizes."""
        model, variables, config = load_trained_model(workdir)
        data = config.get("data", {})
        image_size = int(data.get("image_size") or model.image_size or 224)
        resize_size = int(data.get("resize_size") or round(image_size / 0.875))
        return cls(model, variables, image_size, resize_size, batch_size)

    def load_images(self, paths: Sequence[str]) -> np.ndarray:
        """Decode files with the evaluation preprocessing; returns uint8 [n, S, S, 3]."""
        images = np.zeros((len(paths), self.image_size, self.image_size, 3), dtype=np.uint8)
        for row, path in enumerate(paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image file not found: {path}")

            def box(width, height):
                return center_crop_box(width, height, self.image_size, self.resize_size)

            images[row] = decode_crop(path, box, self.image_size, name=path)
        return images

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on uint8 [n, S, S, 3] images.

        Returns:
          (codes float32 [n, K] in (-1, 1), attention float32 [n, K, T] over the image tokens).
        """
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"images must be uint8 [n, {self.image_size}, {self.image_size}, 3] from load_images, got "
                f"{images.dtype} {images.shape}."
            )
        codes, attention = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size]
            real = batch.shape[0]
            padded = np.zeros((self.batch_size,) + batch.shape[1:], dtype=np.float32)
            padded[:real] = (batch.astype(np.float32) - self.mean) / self.std
            batch_codes, batch_attention = self._forward(self.variables, padded)
            codes.append(np.asarray(batch_codes)[:real])
            attention.append(np.asarray(batch_attention)[:real])

        num_tokens = sum(h * w for h, w in self.grid_shapes)
        if not codes:
            return np.zeros((0, self.code_length), np.float32), np.zeros((0, self.code_length, num_tokens), np.float32)
        return np.concatenate(codes), np.concatenate(attention)

    def encode_paths(self, paths: Sequence[str], log_every: int = 10) -> np.ndarray:
        """Return the continuous codes float32 [n, K] of image files, decoding one batch at a time."""
        codes = []
        num_batches = -(-len(paths) // self.batch_size)
        for index, start in enumerate(range(0, len(paths), self.batch_size)):
            batch_codes, _ = self.encode(self.load_images(paths[start:start + self.batch_size]))
            codes.append(batch_codes)
            if (index + 1) % log_every == 0 or index + 1 == num_batches:
                logging.info("encoded %d of %d database images", min(start + self.batch_size, len(paths)), len(paths))
        if not codes:
            return np.zeros((0, self.code_length), np.float32)
        return np.concatenate(codes)

    def heat_maps(self, attention: np.ndarray, size: int, scale: str) -> np.ndarray:
        """Return attention [..., T] as times-uniform maps float32 [..., size, size]."""
        return times_uniform(attention_maps(attention, self.grid_shapes, (size, size), scale))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _short_name(path: str) -> str:
    """Return "<parent folder>/<file name>", which names the class in image-folder and CUB layouts."""
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{os.path.basename(path)}" if parent else os.path.basename(path)


def _file_stem(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in stem)


def _vmax(maps: Sequence[np.ndarray]) -> float:
    largest = max((float(np.max(heat)) for heat in maps), default=0.0)
    return largest if largest > 0 else 1.0


def image_figure(explainer: Explainer, path: str, image: np.ndarray, codes: np.ndarray,
                 attention: np.ndarray, *, panel_size: int, columns: int, scale: str):
    """Build the per-image figure: the input, then one panel per bit with value and attention map."""
    heat = explainer.heat_maps(attention, panel_size, scale)
    shown = plots.resize_rgb(image, panel_size)
    code_string = "".join("+" if value >= 0 else "-" for value in codes)

    panels = [plots.Panel(shown, None, [("input (eval crop)", plots.TEXT_COLOR)])]
    for bit in range(codes.shape[0]):
        panels.append(plots.Panel(shown, heat[bit], [plots.sign_caption(bit, float(codes[bit]))], sign=1 if codes[bit] >= 0 else -1))

    title = [
        f"{_short_name(path)}: {codes.shape[0]}-bit code {code_string}",
        f"attention per bit ({scale} scales of grids {explainer.grid_shapes}) on the "
        f"{explainer.image_size} px evaluation crop",
    ]
    sections = [plots.Section("", panels, columns)]
    return plots.render_figure(title, sections, panel_size=panel_size, vmax=_vmax(heat))


def bit_figure(bit: int, rows_by_sign, database, bit_row: dict, *, panel_size: int, columns: int):
    """Build the figure of one bit: strongest +1 and -1 database images with this bit's attention.

    `database` maps a database row to (path, label, image uint8, codes [K], heat [K, P, P]).
    """
    sections = []
    all_heat = []
    for sign, rows in zip((1, -1), rows_by_sign):
        panels = []
        for row in rows:
            path, label, image, codes, heat = database[row]
            all_heat.append(heat[bit])
            captions = [
                (f"h={codes[bit]:+.3f}  label {label}", plots.POSITIVE_COLOR if sign > 0 else plots.NEGATIVE_COLOR),
                (_short_name(path), plots.MUTED_COLOR),
            ]
            panels.append(plots.Panel(plots.resize_rgb(image, panel_size), heat[bit], captions, sign=sign))
        name = "+1" if sign > 0 else "-1"
        heading = f"strongest {name}: {len(rows)} images" if rows.size else f"no database image sets bit {bit} to {name}"
        sections.append(plots.Section(heading, panels, columns))

    title = [f"bit {bit}: database images that set it most strongly to +1 and to -1", _bit_summary(bit_row)]
    return plots.render_figure(title, sections, panel_size=panel_size, vmax=_vmax(all_heat))


def _bit_summary(bit_row: dict) -> str:
    partner = bit_row["most_correlated_bit"]
    correlation = "" if partner is None else f", max |corr| {bit_row['max_abs_correlation']:.2f} with bit {partner}"
    flags = [name for name in ("unused", "duplicated") if bit_row[name]]
    flag_text = f"  [{' '.join(flags).upper()}]" if flags else ""
    return (
        f"+1 on {100 * bit_row['positive_fraction']:.1f}% of the exported database, entropy "
        f"{bit_row['entropy_bits']:.2f} bits{correlation}{flag_text}"
    )


def overview_figure(positive, negative, database, stats: dict, *, panel_size: int, per_sign: int):
    """Build one figure with a row per bit: its strongest +1 images, then its strongest -1 images."""
    sections = []
    all_heat = []
    blank = np.full((panel_size, panel_size, 3), plots.EMPTY_PANEL_COLOR, dtype=np.uint8)
    for bit, bit_row in enumerate(stats["bits"]):
        panels = []
        for sign, rows in ((1, positive[bit][:per_sign]), (-1, negative[bit][:per_sign])):
            for slot in range(per_sign):
                if slot >= rows.size:
                    panels.append(plots.Panel(blank, None, [("", plots.MUTED_COLOR)]))
                    continue
                _, label, image, codes, heat = database[rows[slot]]
                all_heat.append(heat[bit])
                caption = (f"{codes[bit]:+.2f} label {label}", plots.POSITIVE_COLOR if sign > 0 else plots.NEGATIVE_COLOR)
                panels.append(plots.Panel(plots.resize_rgb(image, panel_size), heat[bit], [caption], sign=sign))
        sections.append(plots.Section(f"bit {bit}: " + _bit_summary(bit_row), panels, 2 * per_sign, per_sign))

    title = [
        f"strongest +1 (left {per_sign}) and -1 (right {per_sign}) database images per bit, with that bit's "
        "attention; captions: h and database label",
    ]
    return plots.render_figure(title, sections, panel_size=panel_size, vmax=_vmax(all_heat), font_size=11)


def pair_figure(explainer: Explainer, paths: tuple[str, str], images, codes, attention, *,
                panel_size: int, scale: str):
    """Build the query/result figure: bits that agree, then bits that differ, both maps side by side."""
    heat = explainer.heat_maps(attention, panel_size, scale)
    shown = [plots.resize_rgb(image, panel_size) for image in images]
    signs = np.where(codes >= 0, 1, -1)
    agree = np.flatnonzero(signs[0] == signs[1])
    differ = np.flatnonzero(signs[0] != signs[1])

    def pair_panels(bits):
        panels = []
        for bit in bits:
            for side, name in ((0, "query"), (1, "result")):
                text, color = plots.sign_caption(int(bit), float(codes[side, bit]))
                panels.append(plots.Panel(shown[side], heat[side, bit], [(f"{name} {text}", color)], sign=int(signs[side, bit])))
        return panels

    sections = [
        plots.Section("inputs", [
            plots.Panel(shown[0], None, [("query: " + _short_name(paths[0]), plots.TEXT_COLOR)]),
            plots.Panel(shown[1], None, [("result: " + _short_name(paths[1]), plots.TEXT_COLOR)]),
        ], 2),
        plots.Section(f"bits that agree ({agree.size})", pair_panels(agree), 8, 2),
        plots.Section(f"bits that differ ({differ.size})", pair_panels(differ), 8, 2),
    ]
    title = [f"query vs result: Hamming distance {differ.size} of {codes.shape[1]} bits"]
    return plots.render_figure(title, sections, panel_size=panel_size, vmax=_vmax(list(heat.reshape(-1, panel_size, panel_size))))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _export_folder(workdir: str) -> str:
    if os.path.exists(os.path.join(workdir, DATABASE_CODES_FILE)):
        return workdir
    return os.path.join(workdir, EXPORT_DIR)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aqhash_jax.explain",
        description="Write per-bit attention figures and bit statistics of a trained model.",
    )
    parser.add_argument("--workdir", required=True, help="Workdir of a finished run (or its export folder).")
    parser.add_argument("--out", required=True, help="Output folder for the PNG files and bit_stats.json.")
    parser.add_argument("--images", nargs="+", default=[], help="Image files to explain, one figure each.")
    parser.add_argument("--query", help="Query image file of a query/result comparison (with --result).")
    parser.add_argument("--result", help="Result image file of a query/result comparison (with --query).")
    parser.add_argument(
        "--database-limit", type=int, default=None,
        help="Encode a random sample of N database images for the bit figures (default: all; 0: no bit figures).",
    )
    parser.add_argument("--exemplars", type=int, default=6, help="Database images per bit and sign in bit_NN.png.")
    parser.add_argument("--scale", choices=SCALES, default="combined", help="combined: attention of all token grids summed; finest: the grid with the most tokens alone.")
    parser.add_argument("--panel-size", type=int, default=160, help="Side of each image panel in pixels.")
    parser.add_argument("--columns", type=int, default=8, help="Bit panels per row in the image figures.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the --database-limit sample.")
    parser.add_argument("--unused-threshold", type=float, default=bit_stats.DEFAULT_UNUSED_THRESHOLD,
                        help="Flag a bit as unused when its majority sign share is above this.")
    parser.add_argument("--duplicate-threshold", type=float, default=bit_stats.DEFAULT_DUPLICATE_THRESHOLD,
                        help="Flag two bits as duplicated when |correlation| is above this.")
    args = parser.parse_args(argv)

    if (args.query is None) != (args.result is None):
        raise InputError("--query and --result must be given together.")
    if args.database_limit is not None and args.database_limit < 0:
        raise InputError(f"--database-limit must be >= 0, got {args.database_limit}.")
    for name in ("exemplars", "panel_size", "columns", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for path in list(args.images) + [p for p in (args.query, args.result) if p]:
        if not os.path.isfile(path):
            raise InputError(f"image file not found: {path}")
    return args


def _database_codes(workdir: str):
    path = os.path.join(_export_folder(workdir), DATABASE_CODES_FILE)
    if not os.path.exists(path):
        raise InputError(f"database codes not found: {path}; pass the workdir of a finished run with export enabled.")
    return load_codes(path)


def _write(figure, out: str, name: str, written: list[str]) -> None:
    written.append(plots.save_png(figure, os.path.join(out, name)))
    logging.info("wrote %s", written[-1])


def explain_bits(explainer: Explainer, database_file, stats: dict, args, written: list[str]) -> None:
    """Recompute database codes, then write bit_NN.png and bits_overview.png."""
    paths = database_file.paths
    if not paths:
        raise InputError(f"{database_file.path} has no image paths in its sidecar, so the bit figures cannot be drawn; pass --database-limit 0.")
    labels = database_file.labels
    rows = np.arange(len(paths))
    if args.database_limit is not None and args.database_limit < len(paths):
        rows = np.sort(np.random.default_rng(args.seed).choice(len(paths), args.database_limit, replace=False))
    missing = [paths[row] for row in rows if not os.path.isfile(paths[row])]
    if missing:
        raise InputError(
            f"{len(missing)} of {rows.size} database image files not found, first {missing[0]}; run on the "
            "machine that holds the training data, or pass --database-limit 0."
        )

    logging.info("encoding %d database images for the bit figures", rows.size)
    codes = explainer.encode_paths([paths[row] for row in rows])
    agreement = float(np.mean(sign_codes(codes) == database_file.signs()[rows]))
    logging.info("recomputed signs agree with the exported database codes on %.2f%% of bits", 100 * agreement)
    if agreement < 0.99:
        logging.warning(
            "recomputed database signs agree with the exported codes on only %.2f%% of bits; the export "
            "and the model or preprocessing may not match", 100 * agreement,
        )

    positive, negative = select_exemplars(codes, args.exemplars)
    needed = sorted({int(r) for rows_of_bit in positive + negative for r in rows_of_bit})
    images = explainer.load_images([paths[rows[r]] for r in needed])
    _, attention = explainer.encode(images)
    heat = explainer.heat_maps(attention, args.panel_size, args.scale)
    database = {}
    for index, r in enumerate(needed):
        label = "?" if labels is None else str(np.asarray(labels[rows[r]]).tolist())
        database[r] = (paths[rows[r]], label, images[index], codes[r], heat[index])

    for bit in range(explainer.code_length):
        figure = bit_figure(bit, (positive[bit], negative[bit]), database, stats["bits"][bit],
                            panel_size=args.panel_size, columns=args.exemplars)
        _write(figure, args.out, f"bit_{bit:02d}.png", written)

    # The overview uses smaller panels and computes its maps at that size.
    overview_size = max(48, args.panel_size // 2)
    small_heat = explainer.heat_maps(attention, overview_size, args.scale)
    small = {r: (path, label, image, row_codes, small_heat[index])
             for index, (r, (path, label, image, row_codes, _)) in enumerate(database.items())}
    figure = overview_figure(positive, negative, small, stats, panel_size=overview_size, per_sign=min(4, args.exemplars))
    _write(figure, args.out, "bits_overview.png", written)


def run(args: argparse.Namespace) -> list[str]:
    """Write the figures and statistics that `args` requests; returns the written paths."""
    os.makedirs(args.out, exist_ok=True)
    written: list[str] = []

    database_file = _database_codes(args.workdir)
    stats = bit_statistics_of(database_file, args.unused_threshold, args.duplicate_threshold)
    stats_path = os.path.join(args.out, BIT_STATS_FILE)
    bit_stats.write_bit_statistics(stats_path, stats)
    written.append(stats_path)
    print(bit_stats.format_bit_statistics(stats), flush=True)
    if stats["unused_bits"]:
        logging.warning("unused bits (majority share > %g): %s", stats["unused_threshold"], stats["unused_bits"])
    if stats["duplicate_pairs"]:
        logging.warning("duplicated bit pairs (|corr| > %g): %s", stats["duplicate_threshold"],
                        [pair[:2] for pair in stats["duplicate_pairs"]])

    if not args.images and args.query is None and args.database_limit == 0:
        return written

    explainer = Explainer.from_workdir(args.workdir, args.batch_size)
    if explainer.code_length != database_file.code_length:
        raise InputError(
            f"the model has code length {explainer.code_length} but {database_file.path} has "
            f"{database_file.code_length}; the export folder is inconsistent, so re-export the run."
        )

    if args.images:
        images = explainer.load_images(args.images)
        codes, attention = explainer.encode(images)
        for index, path in enumerate(args.images):
            figure = image_figure(explainer, path, images[index], codes[index], attention[index],
                                  panel_size=args.panel_size, columns=args.columns, scale=args.scale)
            _write(figure, args.out, f"image_{index:02d}_{_file_stem(path)}.png", written)

    if args.query is not None:
        pair_paths = (args.query, args.result)
        images = explainer.load_images(list(pair_paths))
        codes, attention = explainer.encode(images)
        figure = pair_figure(explainer, pair_paths, images, codes, attention, panel_size=args.panel_size, scale=args.scale)
        _write(figure, args.out, f"pair_{_file_stem(args.query)}_{_file_stem(args.result)}.png", written)

    if args.database_limit != 0:
        explain_bits(explainer, database_file, stats, args, written)

    return written


def bit_statistics_of(database_file, unused_threshold: float, duplicate_threshold: float) -> dict:
    """Return `bit_stats.bit_statistics` of a loaded code file, with its path in the result."""
    stats = bit_stats.bit_statistics(
        database_file.signs(), unused_threshold=unused_threshold, duplicate_threshold=duplicate_threshold
    )
    stats["codes_file"] = os.path.abspath(database_file.path)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    logging.set_verbosity(logging.INFO)
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        written = run(args)
    except (InputError, ImageDecodeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {len(written)} files to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
