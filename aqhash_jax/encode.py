"""Encode an image collection with a trained model into a code file, incrementally.

    python -m aqhash_jax.encode --workdir=DIR --images PATH [PATH ...] --out CODES.npy \\
        [--batch-size 64] [--read-threads N] [--overwrite] [--prune-missing] [--no-progress]

`--images` takes image files and folders; folders are walked recursively for the image file
endings of `aqhash_jax.data.images.IMAGE_EXTENSIONS` (case-insensitive, hidden files skipped).
Images are preprocessed as the training job's evaluation does: the shorter side is resized to the
trained `data.resize_size`, a centre crop of `data.image_size` is taken and the backbone's input
normalisation is applied. Batches are sharded over a Mesh of all `jax.devices()`, and the codes
are binarised by sign and written with `save_codes`. Files that cannot be decoded are skipped,
and one warning names each of them with the reason.

Rows of the code file are the images sorted by absolute path, and `ids` are the row numbers
0..n-1, so ids change when files are added and the path is the stable key. The sidecar's `extra`
stores each file's size and modification time (`file_sizes`, `file_mtimes_ns`), the image size,
resize size and backbone, and the model workdir.

Re-running with an existing `--out` encodes only paths that are not in the file yet, or whose size
or modification time changed, and merges them into path order. The result has the same codes,
paths, ids and file statistics as a full encode of the union of old and new inputs. Rows whose
paths are not among the current inputs stay in the file; `--prune-missing` drops the rows whose
files no longer exist. Appending to a file written by a model with another fingerprint or code
length is rejected unless `--overwrite` is given, which encodes everything anew.

The new file is written under temporary names in the folder of `--out` and renamed over the old
one only after every byte is on disk, so a failure while encoding or writing keeps the old file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from typing import Iterable, Sequence

import jax
import numpy as np
from absl import app, logging
from absl.flags import argparse_flags
from etils import epath

from aqhash_jax import host_memory
from aqhash_jax.data import images as images_lib
from aqhash_jax.data.pipeline import make_eval_loader
from aqhash_jax.data.sources import ImageSplit
from aqhash_jax.models.backbones import input_normalization
from aqhash_jax.retrieval.codes import pack_codes, sign_codes
from aqhash_jax.retrieval.export import CodeFile, compute_fingerprint, load_codes, save_codes
from aqhash_jax.training import evaluation
from aqhash_jax.training import export as export_lib
from aqhash_jax.training import mesh as mesh_lib

USAGE_ERROR = 2
ENCODER_NAME = "aqhash_jax.encode"
DEFAULT_BATCH_SIZE = 64

# Unreadable files named one by one in the warning; the rest are counted.
_LISTED_FAILURES = 50


class EncodeError(ValueError):
    """Invalid encode input or an existing code file that cannot be appended to."""


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A trained model loaded for encoding images.

    Attributes:
      model: the `HashModel`.
      variables: inference variables {"params", "batch_stats"} as numpy trees.
      config: the run's training config as a dict.
      fingerprint: sha256 hex digest of the parameters, model config and training config, the
        value the training export stores in its code files.
      code_length: bits per code.
      image_size: side of the square network input in pixels.
      resize_size: shorter side before the centre crop, in pixels.
      backbone: backbone name, which selects the input normalisation.
      workdir: the workdir or export folder the model came from.
    """

    model: object
    variables: dict
    config: dict
    fingerprint: str
    code_length: int
    image_size: int
    resize_size: int
    backbone: str
    workdir: str

    @property
    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        return input_normalization(self.backbone)


def _export_folder(workdir: str) -> epath.Path:
    folder = epath.Path(workdir)
    if not (folder / export_lib.MODEL_FILE).exists():
        folder = folder / export_lib.EXPORT_DIR
    return folder


def model_fingerprint(workdir: str | os.PathLike) -> str:
    """Compute the fingerprint of an exported model as the training export does.

    It is the sha256 of the JSON of {"params_sha256": sha256 of model.msgpack, "model":
    model_config.json, "config": config.json}, so codes written here and the export's own code
    files carry the same fingerprint for the same model.
    """
    folder = _export_folder(os.fspath(workdir))
    payload = (folder / export_lib.MODEL_FILE).read_bytes()
    model_dict = json.loads((folder / export_lib.MODEL_CONFIG_FILE).read_text())
    config_json = json.loads((folder / export_lib.CONFIG_FILE).read_text())
    return compute_fingerprint({"params_sha256": compute_fingerprint(payload), "model": model_dict, "config": config_json})


def load_encoder(workdir: str | os.PathLike) -> Encoder:
    """Load the exported model of a finished training run for encoding.

    Raises:
      FileNotFoundError when `workdir` contains no export.
    """
    workdir = os.fspath(workdir)
    model, variables, config = export_lib.load_trained_model(workdir)
    data = config.get("data", {})
    code_length = int(config["model"]["code_length"])
    return Encoder(
        model=model,
        variables=variables,
        config=config,
        fingerprint=model_fingerprint(workdir),
        code_length=code_length,
        image_size=int(data["image_size"]),
        resize_size=int(data["resize_size"]),
        backbone=str(config["model"]["backbone"]),
        workdir=workdir,
    )


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(images_lib.IMAGE_EXTENSIONS)


def collect_image_paths(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Return the absolute paths of the images named by `inputs`, sorted and without duplicates.

    A file is taken as given, whatever its ending. A folder is walked recursively (following
    symbolic links to folders) for files with an image ending, hidden files and folders excluded.

    Raises:
      EncodeError when an input does not exist or nothing is found.
    """
    if not inputs:
        raise EncodeError("no image inputs given; pass image files or folders to --images.")
    found = set()
    for item in inputs:
        path = os.path.abspath(os.fspath(item))
        if os.path.isfile(path):
            found.add(path)
        elif os.path.isdir(path):
            for folder, subfolders, files in os.walk(path, followlinks=True):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                found.update(os.path.join(folder, name) for name in files if _is_image_name(name))
        else:
            raise EncodeError(f"image input {item} not found; pass existing image files or folders.")
    if not found:
        raise EncodeError(
            f"no image files found under {', '.join(map(os.fspath, inputs))}; image endings are "
            f"{', '.join(images_lib.IMAGE_EXTENSIONS)}."
        )
    return sorted(found)


def file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (sizes, mtimes_ns), int64 [n] each; -1 for files that cannot be stat'ed."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for row, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError:
            continue
        sizes[row] = stat.st_size
        mtimes[row] = stat.st_mtime_ns
    return sizes, mtimes


@dataclasses.dataclass
class EncodedImages:
    """Result of `encode_images`.

    Attributes:
      paths: the images that were encoded, in input order.
      codes: float32 [len(paths), code_length] continuous codes in (-1, 1).
      failed: the inputs that could not be decoded, with reasons.
      seconds: wall time of the encoding loop.
    """

    paths: list[str]
    codes: np.ndarray
    failed: list[images_lib.UnreadableImage]
    seconds: float


def _padded_batch_size(batch_size: int, num_devices: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise EncodeError(f"batch size must be a positive int, got {batch_size!r}.")
    return -(-int(batch_size) // num_devices) * num_devices


def _failure_reason(path: str) -> str:
    if not os.path.exists(path):
        return "file not found"
    reason = images_lib.check_image(path, full_decode=True)
    return reason or "decoding failed while encoding (see the log above)"


def encode_images(
    encoder: Encoder,
    paths: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    read_threads: int = 0,
    progress: bool = True,
) -> EncodedImages:
    """Encode image files with the trained model, sharding each batch over all devices.

    Args:
      encoder: from `load_encoder`.
      paths: image file paths.
      batch_size: images per step, rounded up to a multiple of `jax.device_count()`; the last
        batch is padded to full size.
      read_threads: decoding threads; 0 picks min(4, CPU count).
      progress: show a tqdm progress bar with images/s on stderr.

    Returns:
      EncodedImages with the codes of the decodable images; undecodable ones are in `failed`.
    """
    paths = [os.fspath(path) for path in paths]
    if not paths:
        return EncodedImages(paths=[], codes=np.zeros((0, encoder.code_length), np.float32), failed=[], seconds=0.0)
    if jax.process_count() > 1:
        raise EncodeError(
            f"encoding runs in a single process, but JAX has {jax.process_count()} processes; run the "
            "encode command on one host."
        )

    mesh = mesh_lib.make_mesh()
    global_batch = _padded_batch_size(batch_size, mesh.devices.size)
    encode_fn = evaluation.make_encode_fn(encoder.model, mesh, from_features=False)
    replicated = mesh_lib.replicated(mesh)
    params = jax.device_put(encoder.variables["params"], replicated)
    batch_stats = jax.device_put(encoder.variables.get("batch_stats", {}), replicated)
    batch_sharding = mesh_lib.batch_sharded(mesh)

    split = ImageSplit(
        "gallery", paths, np.zeros(len(paths), dtype=np.int32), np.arange(len(paths), dtype=np.int64),
        paths, ("unlabelled",),
    )
    mean, std = encoder.mean_std
    loader = make_eval_loader(
        split, global_batch_size=global_batch, image_size=encoder.image_size, resize_size=encoder.resize_size,
        mean=mean, std=std, read_threads=read_threads, shard_index=0, shard_count=1,
    )
    logging.info(
        "Encoding %d images at %d px in batches of %d over %d devices.",
        len(paths), encoder.image_size, global_batch, mesh.devices.size,
    )

    codes = np.zeros((len(paths), encoder.code_length), dtype=np.float32)
    decoded = np.zeros(len(paths), dtype=bool)
    start = time.perf_counter()
    with _progress_bar(len(paths), progress) as bar:
        for batch in loader:
            images = jax.device_put(batch["image"], batch_sharding)
            batch_codes = np.asarray(jax.device_get(encode_fn(params, batch_stats, images)), dtype=np.float32)
            real = batch["index"] >= 0
            ok = real & batch["mask"]
            codes[batch["index"][ok]] = batch_codes[ok]
            decoded[batch["index"][ok]] = True
            bar.update(int(real.sum()))
    seconds = time.perf_counter() - start

    failed = [images_lib.UnreadableImage(paths[row], _failure_reason(paths[row])) for row in np.flatnonzero(~decoded)]
    encoded_rows = np.flatnonzero(decoded)
    logging.info(
        "Encoded %d images in %.1f s (%.1f images/s); %d could not be decoded.",
        encoded_rows.size, seconds, len(paths) / max(seconds, 1e-9), len(failed),
    )
    return EncodedImages(
        paths=[paths[row] for row in encoded_rows], codes=codes[encoded_rows], failed=failed, seconds=seconds
    )


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count: int) -> None:
        del count


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encode", file=sys.stderr, smoothing=0.1)


def warn_unreadable(failed: Iterable[images_lib.UnreadableImage]) -> None:
    """Log one warning that names each skipped file and its reason (the first 50, then a count)."""
    failed = list(failed)
    if not failed:
        return
    lines = [f"  {item.path}: {item.reason}" for item in failed[:_LISTED_FAILURES]]
    if len(failed) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(failed) - _LISTED_FAILURES} more")
    logging.warning("Skipped %d unreadable image files:\n%s", len(failed), "\n".join(lines))


@dataclasses.dataclass
class EncodeSummary:
    """Counts and paths of one `encode_collection` run.

    Attributes:
      out: the code file path.
      num_rows: rows in the code file afterwards.
      encoded: paths encoded in this run.
      reused: rows taken over from the existing file unchanged.
      changed: paths re-encoded because their size or modification time changed.
      pruned: rows dropped by `prune_missing` or because a changed file no longer decodes.
      failed: files skipped because they could not be decoded.
      written: False when the existing file was already up to date and was left untouched.
    """

    out: str
    num_rows: int
    encoded: list[str]
    reused: int
    changed: list[str]
    pruned: list[str]
    failed: list[images_lib.UnreadableImage]
    written: bool


def _load_existing(out: str, encoder: Encoder) -> CodeFile:
    try:
        existing = load_codes(out)
    except ValueError as error:
        raise EncodeError(f"{error}. Pass --overwrite to replace {out} with a new encode.") from error

    if existing.code_length != encoder.code_length:
        raise EncodeError(
            f"{out} contains {existing.code_length}-bit codes but the model in {encoder.workdir} writes "
            f"{encoder.code_length}-bit codes; pass --overwrite to re-encode everything, or choose another --out."
        )
    if existing.fingerprint != encoder.fingerprint:
        raise EncodeError(
            f"{out} was written by a model with fingerprint {str(existing.fingerprint)[:12]}, but the model in "
            f"{encoder.workdir} has fingerprint {encoder.fingerprint[:12]}; pass --overwrite to re-encode "
            "everything, or choose another --out."
        )
    extra = existing.metadata.get("extra") or {}
    if existing.paths is None or "file_sizes" not in extra or "file_mtimes_ns" not in extra:
        raise EncodeError(
            f"{out} has no image paths or file statistics, so it was not written by {ENCODER_NAME}; pass "
            "--overwrite to replace it."
        )
    return existing


def encode_collection(
    encoder: Encoder,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    read_threads: int = 0,
    overwrite: bool = False,
    prune_missing: bool = False,
    progress: bool = True,
) -> EncodeSummary:
    """Encode the images under `inputs` into the code file `out`, reusing rows already in it.

    See the module docstring for the row order, the incremental rules and the atomic write.

    Raises:
      EncodeError for missing inputs, an `out` without ".npy", or an existing `out` with another
      fingerprint or code length (unless `overwrite`).
    """
    out = os.fspath(out)
    if not out.endswith(".npy"):
        raise EncodeError(f"--out must end with .npy, got {out!r}.")
    out_folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_folder):
        raise EncodeError(f"folder {out_folder} of --out does not exist; create it first.")
    paths = collect_image_paths(inputs)
    sizes, mtimes = file_stats(paths)

    # Rows of the new file by path: (packed code row, size, mtime).
    rows: dict[str, tuple[np.ndarray, int, int]] = {}
    changed, pruned = [], []
    if os.path.exists(out) and not overwrite:
        existing = _load_existing(out, encoder)
        extra = existing.metadata["extra"]
        for row, path in enumerate(existing.paths):
            rows[path] = (existing.packed[row], int(extra["file_sizes"][row]), int(extra["file_mtimes_ns"][row]))
        logging.info("Found %d rows in %s.", len(rows), out)
    elif os.path.exists(out):
        logging.info("Overwriting %s.", out)

    to_encode = []
    for path, size, mtime in zip(paths, sizes, mtimes):
        if path not in rows:
            to_encode.append(path)
        elif rows[path][1:] != (int(size), int(mtime)):
            changed.append(path)
            to_encode.append(path)
    encode_set = set(to_encode)
    reused = len([path for path in rows if path not in encode_set])
    if prune_missing:
        pruned = [path for path in rows if not os.path.exists(path)]
        for path in pruned:
            del rows[path]
        reused -= len(pruned)
    if changed:
        logging.info("Re-encoding %d files whose size or modification time changed.", len(changed))

    if not to_encode and not pruned:
        logging.info("%s is up to date (%d rows); nothing to encode.", out, len(rows))
        return EncodeSummary(out, len(rows), [], reused, [], [], [], written=False)

    result = encode_images(encoder, to_encode, batch_size=batch_size, read_threads=read_threads, progress=progress)
    warn_unreadable(result.failed)
    for item in result.failed:
        if item.path in rows:
            # A changed file that no longer decodes: its old code describes other pixels.
            del rows[item.path]
            pruned.append(item.path)
    stat_of = {path: (int(size), int(mtime)) for path, size, mtime in zip(paths, sizes, mtimes)}
    if result.paths:
        new_packed = pack_codes(sign_codes(result.codes))
        for row, path in enumerate(result.paths):
            rows[path] = (new_packed[row], *stat_of[path])

    if not rows:
        raise EncodeError(
            f"none of the {len(paths)} images could be decoded, so there is nothing to write to {out}."
        )
    write_code_file(out, rows, encoder)
    return EncodeSummary(
        out, len(rows), list(result.paths), reused, changed, pruned, result.failed, written=True
    )


def write_code_file(out: str, rows: dict[str, tuple[np.ndarray, int, int]], encoder: Encoder) -> None:
    """Write {path: (packed row uint32 [words], size, mtime_ns)} to `out` in path order, atomically.

    `save_codes` writes the array and sidecar under temporary names in the folder of `out`. Both
    are then renamed over the old pair, so a failure before the renames keeps the old file.
    NOTE: a crash between the two renames leaves the new array next to the old sidecar, which
    `load_codes` rejects (row count mismatch) unless both have the same row count.
    """
    ordered = sorted(rows)
    packed = np.stack([rows[path][0] for path in ordered]).astype(np.uint32, copy=False)
    extra = {
        "encoder": ENCODER_NAME,
        "model_workdir": os.path.abspath(encoder.workdir) if "://" not in encoder.workdir else encoder.workdir,
        "backbone": encoder.backbone,
        "image_size": encoder.image_size,
        "resize_size": encoder.resize_size,
        "file_sizes": [rows[path][1] for path in ordered],
        "file_mtimes_ns": [rows[path][2] for path in ordered],
    }

    folder = os.path.dirname(os.path.abspath(out))
    staging = os.path.join(folder, f".{os.path.basename(out)}.staging-{uuid.uuid4().hex}.npy")
    try:
        save_codes(
            staging, packed, code_length=encoder.code_length, ids=list(range(len(ordered))), paths=ordered,
            split="gallery", fingerprint=encoder.fingerprint, extra=extra,
        )
        os.replace(staging, out)
        os.replace(staging + ".json", out + ".json")
    finally:
        for leftover in (staging, staging + ".json"):
            if os.path.exists(leftover):
                os.remove(leftover)
    logging.info("Wrote %d codes of %d bits to %s.", len(ordered), encoder.code_length, out)


def _build_parser() -> argparse_flags.ArgumentParser:
    # argparse_flags also parses absl's own flags (--verbosity, --logtostderr); --helpfull lists them.
    parser = argparse_flags.ArgumentParser(
        prog="python -m aqhash_jax.encode",
        description="Encode image files and folders with a trained model into a code file (.npy with a JSON sidecar).",
    )
    parser.add_argument("--workdir", required=True, help="workdir of a finished training run, or its export folder")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files and folders (walked recursively)")
    parser.add_argument("--out", required=True, help="code file to write or extend, ending in .npy")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per step, rounded up to a multiple of the device count (default %(default)s)")
    parser.add_argument("--read-threads", type=int, default=0, help="image decoding threads; 0 picks min(4, CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="encode everything anew, replacing --out even if another model wrote it")
    parser.add_argument("--prune-missing", action="store_true", help="drop rows whose image files no longer exist")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _parse_flags(argv: list[str]):
    return _build_parser().parse_args(argv[1:])


def main(args) -> None:
    try:
        host_memory.configure_host_allocator()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    try:
        encoder = load_encoder(args.workdir)
        summary = encode_collection(
            encoder, args.images, args.out, batch_size=args.batch_size, read_threads=args.read_threads,
            overwrite=args.overwrite, prune_missing=args.prune_missing, progress=not args.no_progress,
        )
    except (EncodeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    print(
        f"{summary.out}: {summary.num_rows} rows; encoded {len(summary.encoded)} "
        f"({len(summary.changed)} changed), reused {summary.reused}, dropped {len(summary.pruned)}, "
        f"skipped {len(summary.failed)} unreadable"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
