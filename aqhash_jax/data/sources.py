"""Image sources for retrieval: CUB-style directories, image folders, list files and TFDS.

Every source yields `ImageSplit` objects, which are grain random-access data sources whose
records are `{"image": encoded bytes, "label": int32 or int32 [L], "index": int32,
"path": str}`. `index` is the row of the record in its split, which ADSH uses to address
its code matrix. `load_retrieval_splits(data_config)` assigns the retrieval roles (train,
query set, database, optional validation split).

Supported layouts:

- CUB-200-2011 ("cub"), original form: `images.txt` ("1 001.Black_footed_Albatross/x.jpg",
  ids from 1, space-separated), `classes.txt` ("1 001.Black_footed_Albatross"),
  `image_class_labels.txt` ("1 1"), `train_test_split.txt` ("1 0", 1 = train) and
  `images/<class folder>/`. The comma form has the same files with "<id>, <value>" lines,
  ids from 0 and class folders without the "NNN." prefix. Both forms are detected from
  the first line of `images.txt`.
- Image folder ("image_folder"): `root/<split>/<class>/*.jpg`.
- List files ("list"): `root/<split>.txt` (or a split given as a path to a file) with
  "<path> <label>" lines, paths relative to the list file's folder, labels an integer id,
  a class name, or several of either joined by commas (multi-label). An optional
  `root/classes.txt` (one class name per line, line i is class i) fixes the class list.
- TFDS ("tfds"): a prepared array-record dataset read with `tfds.data_source`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from aqhash_jax.data import images as images_lib

# How many unreadable files a warning or error names before it only counts them.
_NAMED_FILES_IN_MESSAGE = 5

_CUB_METADATA_FILES = (
    "images.txt",
    "classes.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
)
_CUB_EXPECTED_LAYOUT = (
    "expected a CUB-200-2011 directory with images.txt, classes.txt, "
    "image_class_labels.txt, train_test_split.txt and images/<class folder>/*.jpg, where "
    "each metadata line is either '<id> <value>' (original CUB form, for example "
    "'1 001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg') or "
    "'<id>, <value>' (comma form, for example '0, Black_footed_Albatross/0000.jpg')"
)
_IMAGE_FOLDER_EXPECTED_LAYOUT = "expected an image folder laid out as <root>/<split>/<class>/<image file>"
_LIST_EXPECTED_LAYOUT = (
    "expected list files <root>/<split>.txt with one '<path> <label>' line per image, paths "
    "relative to the list file's folder and labels given as an integer id or a class name, "
    "and optionally <root>/classes.txt with one class name per line"
)


class DataLayoutError(ValueError):
    """Raised when a data root, metadata file or label does not match the expected layout."""


class UnreadableImagesError(DataLayoutError):
    """Raised in strict mode when the readability scan finds unreadable image files."""


class TfdsNotPreparedError(RuntimeError):
    """Raised when a TFDS dataset is not prepared in array-record format in its data_dir."""


# ---------------------------------------------------------------------------------------
# ImageSplit


@dataclasses.dataclass(frozen=True)
class TfdsImageGetter:
    """Callable returning the encoded image bytes of one row of a TFDS data source.

    NOTE: worker processes (worker_count > 0) receive the TFDS source by pickling. Only a
    picklable stand-in source is tested here, not a prepared array-record dataset.
    """

    source: Any
    row: int
    image_key: str

    def __call__(self) -> bytes:
        value = self.source[self.row][self.image_key]
        if isinstance(value, np.ndarray):
            value = value.item()
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(
                f"TFDS feature {self.image_key!r} of row {self.row} is {type(value).__name__}, "
                "expected encoded image bytes; open the source with "
                "decoders={image_key: tfds.decode.SkipDecoding()}"
            )
        return bytes(value)


class ImageSplit:
    """One split of an image set, usable as a grain `RandomAccessDataSource`.

    Attributes:
      name: split name, for messages and `repr`.
      records: per row, a file path (str) or a zero-argument callable returning the
        encoded image bytes.
      labels: int32 [n] class indices in 0..C-1, or int32 [n, C] multi-hot rows.
      ids: int64 [n] image ids of the source (CUB image id, or the row in the source's own
        listing for the other layouts).
      paths: per row, the file path or a readable locator such as "food101/train[17]".
      class_names: names of the C classes, in label order.
      strict: raise on an image that cannot be read, instead of returning empty bytes.
    """

    def __init__(
        self,
        name: str,
        records: Sequence[str | Callable[[], bytes]],
        labels: np.ndarray,
        ids: np.ndarray,
        paths: Sequence[str],
        class_names: Sequence[str],
        *,
        strict: bool = False,
    ):
        labels = np.asarray(labels)
        ids = np.asarray(ids)
        num_records = len(records)
        if labels.dtype != np.int32:
            raise ValueError(
                f"labels of split {name!r} have dtype {labels.dtype}, expected int32; "
                "convert them with labels.astype(np.int32) after checking the range"
            )
        if labels.ndim not in (1, 2) or labels.shape[0] != num_records:
            raise ValueError(
                f"labels of split {name!r} have shape {labels.shape}, expected "
                f"[{num_records}] or [{num_records}, num_classes]"
            )
        if ids.ndim != 1 or ids.shape[0] != num_records:
            raise ValueError(f"ids of split {name!r} have shape {ids.shape}, expected [{num_records}]")
        if len(paths) != num_records:
            raise ValueError(f"split {name!r} has {len(paths)} paths for {num_records} records")

        num_classes = len(class_names)
        if labels.ndim == 2 and labels.shape[1] != num_classes:
            raise ValueError(
                f"multi-hot labels of split {name!r} have {labels.shape[1]} columns for "
                f"{num_classes} class names"
            )
        if labels.ndim == 1 and num_records and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels of split {name!r} span [{labels.min()}, {labels.max()}], outside the "
                f"{num_classes} classes"
            )

        self.name = name
        self.records = list(records)
        self.labels = labels
        self.ids = ids.astype(np.int64)
        self.paths = [str(p) for p in paths]
        self.class_names = tuple(str(c) for c in class_names)
        self.strict = strict
        self._fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.records)

    def read_bytes(self, row: int) -> bytes:
        """Return the encoded image bytes of `row`, or b"" when it cannot be read.

        Raises OSError in strict mode instead of returning b"".
        """
        record = self.records[row]
        try:
            if callable(record):
                return record()
            with open(record, "rb") as handle:
                return handle.read()
        except OSError as error:
            if self.strict:
                raise
            logging.warning("Cannot read image %s of split %s: %s", self.paths[row], self.name, error)
            return b""

    def __getitem__(self, row: int) -> dict[str, Any]:
        row = int(row)
        if not 0 <= row < len(self.records):
            raise IndexError(f"row {row} is outside split {self.name!r} of {len(self.records)} records")
        return {
            "image": self.read_bytes(row),
            "label": self.labels[row],
            "index": np.int32(row),
            "path": self.paths[row],
        }

    def fingerprint(self) -> str:
        """Return a short hash of paths and labels, stable across processes and runs."""
        if self._fingerprint is None:
            digest = hashlib.sha1()
            for path in self.paths:
                digest.update(path.encode("utf-8", "surrogateescape"))
                digest.update(b"\0")
            digest.update(np.ascontiguousarray(self.labels).tobytes())
            self._fingerprint = digest.hexdigest()[:12]
        return self._fingerprint

    def __repr__(self) -> str:
        # grain stores repr(data_source) in iterator state and compares it on restore.
        return (
            f"ImageSplit(name={self.name!r}, num_records={len(self)}, "
            f"num_classes={self.num_classes}, fingerprint={self.fingerprint()})"
        )

    def subset(self, rows: Sequence[int] | np.ndarray, name: str | None = None) -> "ImageSplit":
        """Return the split restricted to `rows` (int [m]); rows are renumbered 0..m-1."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {rows.shape}")
        return ImageSplit(
            name or self.name,
            [self.records[r] for r in rows],
            self.labels[rows],
            self.ids[rows],
            [self.paths[r] for r in rows],
            self.class_names,
            strict=self.strict,
        )


def concatenate_splits(splits: Sequence[ImageSplit], name: str) -> ImageSplit:
    """Join splits that share a class list into one split named `name`."""
    if not splits:
        raise ValueError("concatenate_splits needs at least one split")
    class_names = splits[0].class_names
    for split in splits[1:]:
        if split.class_names != class_names:
            raise ValueError(
                f"cannot join split {split.name!r} to {splits[0].name!r}: class lists differ"
            )
    return ImageSplit(
        name,
        [r for s in splits for r in s.records],
        np.concatenate([s.labels for s in splits], axis=0),
        np.concatenate([s.ids for s in splits], axis=0),
        [p for s in splits for p in s.paths],
        class_names,
        strict=splits[0].strict,
    )


def drop_unreadable(
    split: ImageSplit, *, mode: str, strict: bool, num_threads: int = 8
) -> ImageSplit:
    """Scan a file-backed split and remove unreadable images.

    Args:
      split: the split to check. Rows backed by byte getters (TFDS) are not scanned.
      mode: "quick" (header, verify, JPEG end marker), "full" (decode every file) or "off".
      strict: raise `UnreadableImagesError` naming the files instead of dropping them.
      num_threads: threads for the scan.

    Returns:
      The split without the unreadable rows (the same object when nothing was dropped).
    """
    if mode not in ("quick", "full", "off"):
        raise ValueError(f"validate mode must be 'quick', 'full' or 'off', got {mode!r}")
    if mode == "off":
        return split

    file_rows = [i for i, r in enumerate(split.records) if isinstance(r, str)]
    if not file_rows:
        return split
    file_paths = [split.records[i] for i in file_rows]
    unreadable = images_lib.scan_images(file_paths, full_decode=mode == "full", num_threads=num_threads)
    if not unreadable:
        return split

    named = ", ".join(f"{u.path} ({u.reason})" for u in unreadable[:_NAMED_FILES_IN_MESSAGE])
    more = len(unreadable) - _NAMED_FILES_IN_MESSAGE
    if more > 0:
        named += f" and {more} more"
    if strict:
        raise UnreadableImagesError(
            f"split {split.name!r} has {len(unreadable)} unreadable image files: {named}. "
            "Remove or replace them, or set strict=False to skip them"
        )
    logging.warning(
        "Split %s: skipped %d unreadable image files: %s", split.name, len(unreadable), named
    )
    bad = {u.path for u in unreadable}
    keep = [i for i, r in enumerate(split.records) if not (isinstance(r, str) and r in bad)]
    return split.subset(keep)


# ---------------------------------------------------------------------------------------
# CUB-200-2011 directories


def _require_dir(root: Path, expected: str) -> None:
    if not root.exists():
        raise DataLayoutError(f"data root {root} does not exist; {expected}")
    if not root.is_dir():
        raise DataLayoutError(f"data root {root} is not a directory; {expected}")


def detect_cub_format(root: str | os.PathLike) -> str:
    """Return "original" or "comma" for a CUB-style directory; raise DataLayoutError otherwise."""
    root = Path(root)
    _require_dir(root, _CUB_EXPECTED_LAYOUT)
    missing = [f for f in _CUB_METADATA_FILES if not (root / f).is_file()]
    if not (root / "images").is_dir():
        missing.append("images/")
    if missing:
        raise DataLayoutError(f"{root} is missing {', '.join(missing)}; {_CUB_EXPECTED_LAYOUT}")

    with open(root / "images.txt", encoding="utf-8") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    if re.match(r"^\d+\s*,\s*\S", first):
        return "comma"
    if re.match(r"^\d+\s+\S", first):
        return "original"
    raise DataLayoutError(
        f"cannot read the first line of {root / 'images.txt'} ({first!r}); {_CUB_EXPECTED_LAYOUT}"
    )


def _read_id_table(path: Path, cub_format: str) -> list[tuple[int, str, int]]:
    """Read "<id> <value>" or "<id>, <value>" lines as (id, value, line number)."""
    rows = []
    seen: dict[int, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if cub_format == "comma":
                parts = [p.strip() for p in text.split(",", 1)]
            else:
                parts = text.split(None, 1)
            if len(parts) != 2 or not parts[1] or not re.fullmatch(r"\d+", parts[0]):
                raise DataLayoutError(
                    f"invalid line {line_number} of {path}: {text!r}; {_CUB_EXPECTED_LAYOUT}"
                )
            key = int(parts[0])
            if key in seen:
                raise DataLayoutError(
                    f"{path} lists id {key} twice (lines {seen[key]} and {line_number})"
                )
            seen[key] = line_number
            rows.append((key, parts[1], line_number))
    if not rows:
        raise DataLayoutError(f"{path} is empty; {_CUB_EXPECTED_LAYOUT}")
    return rows


def _int_value(path: Path, line_number: int, value: str) -> int:
    if not re.fullmatch(r"-?\d+", value):
        raise DataLayoutError(f"line {line_number} of {path} has {value!r} where an integer is expected")
    return int(value)


def load_cub(
    root: str | os.PathLike, split_names: Sequence[str], *, strict: bool = False
) -> dict[str, ImageSplit]:
    """Load splits "train" (flag 1), "test" (flag 0) or "all" from a CUB-style directory.

    Class ids from classes.txt are sorted and renumbered 0..C-1; class names drop the
    "NNN." prefix. Image files are not opened here (see `drop_unreadable`).
    """
    root = Path(root)
    cub_format = detect_cub_format(root)
    logging.info("Reading %s as a CUB-200-2011 directory in %s form", root, cub_format)

    class_rows = _read_id_table(root / "classes.txt", cub_format)
    class_ids = sorted(key for key, _, _ in class_rows)
    class_index = {key: i for i, key in enumerate(class_ids)}
    name_by_id = {key: re.sub(r"^\d+\.", "", value) for key, value, _ in class_rows}
    class_names = [name_by_id[key] for key in class_ids]

    image_rows = _read_id_table(root / "images.txt", cub_format)
    label_path = root / "image_class_labels.txt"
    labels_by_image = {
        key: (_int_value(label_path, line, value), line)
        for key, value, line in _read_id_table(label_path, cub_format)
    }
    split_path = root / "train_test_split.txt"
    flags_by_image = {
        key: (_int_value(split_path, line, value), line)
        for key, value, line in _read_id_table(split_path, cub_format)
    }

    ids, paths, labels, flags = [], [], [], []
    for image_id, relative_path, line_number in image_rows:
        if image_id not in labels_by_image:
            raise DataLayoutError(
                f"image id {image_id} (line {line_number} of {root / 'images.txt'}) has no "
                f"label in {label_path}"
            )
        if image_id not in flags_by_image:
            raise DataLayoutError(
                f"image id {image_id} (line {line_number} of {root / 'images.txt'}) has no "
                f"train/test flag in {split_path}"
            )
        class_id, label_line = labels_by_image[image_id]
        if class_id not in class_index:
            raise DataLayoutError(
                f"line {label_line} of {label_path} gives class id {class_id}, which is not in "
                f"{root / 'classes.txt'} (ids {class_ids[0]}..{class_ids[-1]})"
            )
        flag, flag_line = flags_by_image[image_id]
        if flag not in (0, 1):
            raise DataLayoutError(
                f"line {flag_line} of {split_path} has flag {flag}; expected 1 (train) or 0 (test)"
            )
        ids.append(image_id)
        paths.append(str(root / "images" / relative_path))
        labels.append(class_index[class_id])
        flags.append(flag)

    ids_array = np.asarray(ids, dtype=np.int64)
    labels_array = np.asarray(labels, dtype=np.int32)
    flags_array = np.asarray(flags, dtype=np.int8)
    masks = {"train": flags_array == 1, "test": flags_array == 0, "all": np.ones_like(flags_array, bool)}

    splits = {}
    for name in split_names:
        if name not in masks:
            raise DataLayoutError(
                f"split {name!r} is not available in CUB directory {root}; use 'train', 'test' or 'all'"
            )
        rows = np.flatnonzero(masks[name])
        splits[name] = ImageSplit(
            name,
            [paths[r] for r in rows],
            labels_array[rows],
            ids_array[rows],
            [paths[r] for r in rows],
            class_names,
            strict=strict,
        )
    return splits


# ---------------------------------------------------------------------------------------
# Image folders


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in images_lib.IMAGE_EXTENSIONS


def load_image_folder(
    root: str | os.PathLike, split_names: Sequence[str], *, strict: bool = False
) -> dict[str, ImageSplit]:
    """Load `root/<split>/<class>/**/<image>` for each split name.

    The class list is the sorted union of class folder names over the requested splits,
    so every split uses the same label numbering. Files with other endings and hidden
    files are ignored.
    """
    root = Path(root)
    _require_dir(root, _IMAGE_FOLDER_EXPECTED_LAYOUT)

    class_folders: dict[str, list[Path]] = {}
    for name in split_names:
        split_dir = root / name
        if not split_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataLayoutError(
                f"split folder {split_dir} not found (folders in {root}: {available}); "
                f"{_IMAGE_FOLDER_EXPECTED_LAYOUT}"
            )
        folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataLayoutError(f"split folder {split_dir} has no class folders; {_IMAGE_FOLDER_EXPECTED_LAYOUT}")
        class_folders[name] = folders

    class_names = sorted({p.name for folders in class_folders.values() for p in folders})
    class_index = {c: i for i, c in enumerate(class_names)}

    splits = {}
    for name, folders in class_folders.items():
        paths, labels, ignored = [], [], 0
        for folder in folders:
            for path in sorted(folder.rglob("*")):
                if _is_image_file(path):
                    paths.append(str(path))
                    labels.append(class_index[folder.name])
                elif path.is_file():
                    ignored += 1
        if ignored:
            logging.info("Split %s: ignored %d files without an image file ending", name, ignored)
        if not paths:
            raise DataLayoutError(f"split folder {root / name} contains no image files; {_IMAGE_FOLDER_EXPECTED_LAYOUT}")
        splits[name] = ImageSplit(
            name,
            paths,
            np.asarray(labels, dtype=np.int32),
            np.arange(len(paths), dtype=np.int64),
            paths,
            class_names,
            strict=strict,
        )
    return splits


# ---------------------------------------------------------------------------------------
# List files


def _list_file_path(root: Path, split_name: str) -> Path:
    candidate = Path(split_name)
    if candidate.suffix and (candidate.is_absolute() or (root / candidate).is_file()):
        return candidate if candidate.is_absolute() else root / candidate
    return root / f"{split_name}.txt"


def _read_list_file(path: Path) -> list[tuple[str, list[str], int]]:
    """Read "<path> <label>[,<label>...]" lines as (absolute path, label tokens, line number)."""
    if not path.is_file():
        raise DataLayoutError(f"list file {path} not found; {_LIST_EXPECTED_LAYOUT}")
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise DataLayoutError(
                    f"invalid line {line_number} of {path}: {text!r}; {_LIST_EXPECTED_LAYOUT}"
                )
            image_path = Path(parts[0])
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            tokens = [t.strip() for t in parts[1].split(",") if t.strip()]
            if not tokens:
                raise DataLayoutError(f"line {line_number} of {path} has no label")
            entries.append((str(image_path), tokens, line_number))
    if not entries:
        raise DataLayoutError(f"list file {path} has no entries; {_LIST_EXPECTED_LAYOUT}")
    return entries


def load_list_files(
    root: str | os.PathLike, split_names: Sequence[str], *, strict: bool = False
) -> dict[str, ImageSplit]:
    """Load list-file splits; see the module docstring for the format.

    With `root/classes.txt`, a label token is a class name from that file or an integer id
    in 0..C-1, and anything else raises DataLayoutError naming the line. Without it, the
    labels of all requested lists are either all integers (renumbered 0..C-1 in sorted id
    order, named by their id) or class names (sorted). A line with several labels makes the
    labels of every split multi-hot int32 [n, C].
    """
    root = Path(root)
    _require_dir(root, _LIST_EXPECTED_LAYOUT)
    lists = {name: (_list_file_path(root, name), _read_list_file(_list_file_path(root, name))) for name in split_names}
    multilabel = any(len(tokens) > 1 for _, entries in lists.values() for _, tokens, _ in entries)

    classes_path = root / "classes.txt"
    all_tokens = [t for _, entries in lists.values() for _, tokens, _ in entries for t in tokens]
    if classes_path.is_file():
        with open(classes_path, encoding="utf-8") as handle:
            class_names = [line.strip() for line in handle if line.strip()]
        if not class_names:
            raise DataLayoutError(f"{classes_path} lists no classes; {_LIST_EXPECTED_LAYOUT}")
        by_name = {c: i for i, c in enumerate(class_names)}

        def resolve(token: str) -> int | None:
            if token in by_name:
                return by_name[token]
            if re.fullmatch(r"\d+", token) and int(token) < len(class_names):
                return int(token)
            return None

        outside_message = f"which is neither a class name in {classes_path} nor an id in 0..{len(class_names) - 1}"
    elif all(re.fullmatch(r"-?\d+", t) for t in all_tokens):
        sorted_ids = sorted({int(t) for t in all_tokens})
        if sorted_ids[0] < 0:
            raise DataLayoutError(f"list files under {root} contain the negative label {sorted_ids[0]}")
        by_id = {class_id: i for i, class_id in enumerate(sorted_ids)}
        class_names = [str(class_id) for class_id in sorted_ids]

        def resolve(token: str) -> int | None:
            return by_id.get(int(token))

        outside_message = ""
    else:
        class_names = sorted(set(all_tokens))
        by_name = {c: i for i, c in enumerate(class_names)}

        def resolve(token: str) -> int | None:
            return by_name.get(token)

        outside_message = ""

    splits = {}
    for name, (list_path, entries) in lists.items():
        paths = []
        if multilabel:
            labels = np.zeros((len(entries), len(class_names)), dtype=np.int32)
        else:
            labels = np.zeros((len(entries),), dtype=np.int32)
        for row, (image_path, tokens, line_number) in enumerate(entries):
            for token in tokens:
                label = resolve(token)
                if label is None:
                    raise DataLayoutError(
                        f"line {line_number} of {list_path} has label {token!r}, {outside_message}"
                    )
                if multilabel:
                    labels[row, label] = 1
                else:
                    labels[row] = label
            paths.append(image_path)
        splits[name] = ImageSplit(
            name, paths, labels, np.arange(len(paths), dtype=np.int64), paths, class_names, strict=strict
        )
    return splits


# ---------------------------------------------------------------------------------------
# TFDS


@dataclasses.dataclass(frozen=True)
class TfdsDatasetSpec:
    """Feature keys and split names of one TFDS catalogue dataset."""

    image_key: str
    label_key: str
    train_split: str
    test_split: str


# Feature keys and train/test splits of fine-grained (and a few general) TFDS datasets, from
# their TFDS 4.9 feature dictionaries. oxford_flowers102 trains on train+validation (1,020
# images each) as retrieval work on that set does; food101 and imagenet2012 have no labelled
# test split, so their validation split is the query set.
TFDS_CATALOGUE: dict[str, TfdsDatasetSpec] = {
    "caltech_birds2011": TfdsDatasetSpec("image", "label", "train", "test"),
    "caltech_birds2010": TfdsDatasetSpec("image", "label", "train", "test"),
    "stanford_dogs": TfdsDatasetSpec("image", "label", "train", "test"),
    "oxford_flowers102": TfdsDatasetSpec("image", "label", "train+validation", "test"),
    "food101": TfdsDatasetSpec("image", "label", "train", "validation"),
    "cars196": TfdsDatasetSpec("image", "label", "train", "test"),
    "oxford_iiit_pet": TfdsDatasetSpec("image", "label", "train", "test"),
    "stanford_online_products": TfdsDatasetSpec("image", "class_id", "train", "test"),
    "cifar100": TfdsDatasetSpec("image", "label", "train", "test"),
    "imagenet2012": TfdsDatasetSpec("image", "label", "train", "validation"),
}


def tfds_dataset_spec(name: str, image_key: str = "", label_key: str = "") -> TfdsDatasetSpec:
    """Return the catalogue entry for `name`, with non-empty `image_key`/`label_key` overriding it.

    A dataset outside `TFDS_CATALOGUE` needs both keys.
    """
    base_name = name.split(":")[0].split("/")[0]
    spec = TFDS_CATALOGUE.get(base_name)
    if spec is None:
        if not image_key or not label_key:
            raise ValueError(
                f"TFDS dataset {name!r} is not in the catalogue ({', '.join(sorted(TFDS_CATALOGUE))}); "
                "set data_config.tfds_image_key and data_config.tfds_label_key to its image and label features"
            )
        return TfdsDatasetSpec(image_key, label_key, "train", "test")
    return dataclasses.replace(
        spec, image_key=image_key or spec.image_key, label_key=label_key or spec.label_key
    )


def resolve_tfds_split(spec: TfdsDatasetSpec, role_split: str) -> str:
    """Map the role names "train" and "test" to the dataset's splits; pass others through."""
    if role_split == "train":
        return spec.train_split
    if role_split == "test":
        return spec.test_split
    return role_split


def _tfds_build_command(name: str, data_dir: str) -> str:
    return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def check_tfds_prepared(name: str, data_dir: str | None) -> Any:
    """Return the TFDS builder for `name`; raise TfdsNotPreparedError unless it is prepared as array_record."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = tfds.builder(name, data_dir=data_dir or None)
    dataset_dir = str(builder.data_dir)
    # builder.data_dir is <data_dir>/<name>/<version>, with a config folder before the
    # version when the name has one ("name/config").
    root_dir = data_dir or str(Path(dataset_dir).parents[2 if "/" in name else 1])
    command = _tfds_build_command(name, root_dir)
    if not builder.is_prepared():
        raise TfdsNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {dataset_dir}. Preparing a TFDS dataset "
            f"needs TensorFlow, which this package does not install. On a machine with "
            f"TensorFlow run `{command}`, then copy {dataset_dir} to this machine "
            f"(or set data_config.tfds_data_dir to where it is)"
        )
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(file_format) != "array_record":
        raise TfdsNotPreparedError(
            f"TFDS dataset {name!r} in {dataset_dir} is stored as {file_format}, which has no "
            f"random access. Rebuild it as array_record on a machine with TensorFlow: `{command}` "
            "(use another --data_dir or delete the old copy first)"
        )
    return builder


def tfds_split_from_source(
    source: Any,
    *,
    name: str,
    image_key: str,
    label_key: str,
    class_names: Sequence[str] | None,
    strict: bool = False,
    chunk_size: int = 256,
) -> ImageSplit:
    """Wrap a random-access TFDS source (len, getitem returning feature dicts) as an ImageSplit.

    The labels of all rows are read here, which reads every record once.
    NOTE: array_record cannot read one feature alone, so this pass reads the image bytes too
    (about the size of the split on disk).
    """
    num_records = len(source)
    if num_records == 0:
        raise DataLayoutError(f"TFDS split {name!r} is empty")

    labels = np.empty((num_records,), dtype=np.int64)
    paths = []
    path_key = None
    for start in range(0, num_records, chunk_size):
        rows = list(range(start, min(start + chunk_size, num_records)))
        if hasattr(source, "__getitems__"):
            examples = source.__getitems__(rows)
        else:
            examples = [source[r] for r in rows]
        for row, example in zip(rows, examples):
            if image_key not in example or label_key not in example:
                raise DataLayoutError(
                    f"row {row} of TFDS split {name!r} has features {sorted(example)}; "
                    f"expected image feature {image_key!r} and label feature {label_key!r}"
                )
            if row == 0:
                path_key = next((k for k in ("image/filename", "file_name", "filename") if k in example), None)
            labels[row] = int(np.asarray(example[label_key]))
            if path_key is not None:
                value = example[path_key]
                value = value.item() if isinstance(value, np.ndarray) else value
                paths.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
            else:
                paths.append(f"{name}[{row}]")

    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    outside = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if outside.size:
        raise DataLayoutError(
            f"row {outside[0]} of TFDS split {name!r} has label {labels[outside[0]]}, outside the "
            f"{len(class_names)} classes of feature {label_key!r}"
        )
    records = [TfdsImageGetter(source, row, image_key) for row in range(num_records)]
    return ImageSplit(
        name,
        records,
        labels.astype(np.int32),
        np.arange(num_records, dtype=np.int64),
        paths,
        class_names,
        strict=strict,
    )


def load_tfds(
    name: str,
    split_names: Sequence[str],
    *,
    data_dir: str | None = None,
    image_key: str = "",
    label_key: str = "",
    strict: bool = False,
) -> dict[str, ImageSplit]:
    """Open TFDS splits (role names "train"/"test" map through `TFDS_CATALOGUE`) as ImageSplits."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    spec = tfds_dataset_spec(name, image_key, label_key)
    builder = check_tfds_prepared(name, data_dir)
    label_feature = builder.info.features[spec.label_key]
    class_names = list(getattr(label_feature, "names", []) or []) or None

    splits = {}
    for role_split in split_names:
        tfds_split = resolve_tfds_split(spec, role_split)
        source = tfds.data_source(
            name,
            split=tfds_split,
            data_dir=data_dir or None,
            download=False,
            decoders={spec.image_key: tfds.decode.SkipDecoding()},
        )
        splits[role_split] = tfds_split_from_source(
            source,
            name=f"{name}/{tfds_split}",
            image_key=spec.image_key,
            label_key=spec.label_key,
            class_names=class_names,
            strict=strict,
        )
    return splits


# ---------------------------------------------------------------------------------------
# Retrieval roles


@dataclasses.dataclass
class RetrievalSplits:
    """Splits in their retrieval roles.

    `database` is the same object as `train` when the database is the training split and no
    validation split was carved, or when the carved rows are also removed from the database.
    """

    train: ImageSplit
    query: ImageSplit
    database: ImageSplit
    validation: ImageSplit | None
    class_names: tuple[str, ...]


def default_data_config() -> ml_collections.ConfigDict:
    """Return the data configuration with its defaults; see the field comments."""
    config = ml_collections.ConfigDict()
    config.source = "cub"  # "cub", "image_folder", "list" or "tfds".
    config.root = ""  # Data directory for "cub", "image_folder" and "list".
    config.tfds_name = ""  # TFDS dataset name, for example "caltech_birds2011".
    config.tfds_data_dir = ""  # TFDS data_dir; "" uses TFDS's default.
    config.tfds_image_key = ""  # Overrides the catalogue's image feature.
    config.tfds_label_key = ""  # Overrides the catalogue's label feature.
    # Split names; "a+b" joins splits. For TFDS, "train" and "test" map to the catalogue's splits.
    config.train_split = "train"
    config.query_split = "test"
    config.database_split = "train"
    # Validation split carved from train, class-stratified: a fraction of each class or a
    # count per class (set at most one of them).
    config.validation_fraction = 0.0
    config.validation_per_class = 0
    config.validation_in_database = False  # Keep carved rows in the database.
    config.seed = 0
    config.image_size = 224  # Side of the square network input in pixels.
    config.resize_size = 256  # Evaluation: shorter side before the centre crop.
    config.crop_scale = (0.35, 1.0)  # Training crop: area fraction range.
    config.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # Training crop: aspect ratio range.
    config.strict = False  # Raise on unreadable images instead of skipping them.
    config.validate = "quick"  # Load-time scan: "quick", "full" (decode all) or "off".
    config.scan_threads = 8
    config.worker_count = 0  # grain worker processes for decoding and augmentation.
    config.worker_buffer_size = 2  # Batches each worker process prepares ahead.
    config.read_threads = 0  # Threads decoding batches in each process; 0 picks min(4, CPUs).
    config.prefetch = 0  # Batches the threads prepare ahead; 0 picks 2 * read_threads.
    return config


def _split_parts(split_name: str) -> list[str]:
    parts = [p.strip() for p in split_name.split("+")]
    if not all(parts):
        raise ValueError(f"invalid split name {split_name!r}; join split names with '+', as in 'train+test'")
    return parts


def _load_named_splits(data_config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, ImageSplit]:
    source = data_config.source
    strict = bool(data_config.strict)
    if source == "tfds":
        if not data_config.tfds_name:
            raise ValueError("data_config.source is 'tfds' but data_config.tfds_name is empty")
        return load_tfds(
            data_config.tfds_name,
            names,
            data_dir=data_config.tfds_data_dir or None,
            image_key=data_config.tfds_image_key,
            label_key=data_config.tfds_label_key,
            strict=strict,
        )

    if not data_config.root:
        raise ValueError(f"data_config.root is empty; set it to the data directory for source {source!r}")
    parts = sorted({p for name in names for p in _split_parts(name)})
    loaders = {"cub": load_cub, "image_folder": load_image_folder, "list": load_list_files}
    if source not in loaders:
        raise ValueError(
            f"data_config.source is {source!r}; expected 'cub', 'image_folder', 'list' or 'tfds'"
        )
    loaded = loaders[source](data_config.root, parts, strict=strict)
    loaded = {
        name: drop_unreadable(
            split, mode=data_config.validate, strict=strict, num_threads=int(data_config.scan_threads)
        )
        for name, split in loaded.items()
    }
    result = {}
    for name in names:
        split_parts = _split_parts(name)
        if len(split_parts) == 1:
            result[name] = loaded[name]
        else:
            result[name] = concatenate_splits([loaded[p] for p in split_parts], name)
    return result


def _stratify_labels(labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 1:
        return labels
    # NOTE: multi-label rows are stratified by their lowest positive class, which keeps
    # every class in train only approximately.
    has_label = labels.any(axis=1)
    return np.where(has_label, labels.argmax(axis=1), -1)


def carve_validation(
    split: ImageSplit, *, fraction: float = 0.0, per_class: int = 0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Choose validation rows per class; return (remaining rows, validation rows), sorted int64.

    Each class gives round(fraction * n_c) rows, or `per_class` rows, but at most n_c - 1 so
    every class keeps a training image; a class with one image gives none.
    """
    if fraction and per_class:
        raise ValueError(
            f"set either validation_fraction ({fraction}) or validation_per_class ({per_class}), not both"
        )
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if per_class < 0:
        raise ValueError(f"validation_per_class must be >= 0, got {per_class}")

    rng = np.random.default_rng(seed)
    strata = _stratify_labels(split.labels)
    validation_rows = []
    clipped = 0
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        requested = int(round(fraction * rows.size)) if fraction else per_class
        take = min(requested, rows.size - 1)
        clipped += take < requested
        if take > 0:
            validation_rows.append(rng.choice(rows, size=take, replace=False))
    if clipped:
        logging.warning(
            "Validation split: %d classes have too few images for the requested share and "
            "keep at least one training image each",
            clipped,
        )
    validation = np.sort(np.concatenate(validation_rows)) if validation_rows else np.zeros((0,), np.int64)
    remaining = np.setdiff1d(np.arange(len(split)), validation)
    return remaining.astype(np.int64), validation.astype(np.int64)


def load_retrieval_splits(data_config: ml_collections.ConfigDict) -> RetrievalSplits:
    """Load the train, query, database and optional validation splits named by `data_config`.

    The validation split, when `validation_fraction` or `validation_per_class` is set, is
    carved from the train split and removed from it; it is also removed from the database
    when the database is the train split, unless `validation_in_database` is set.
    """
    names = [data_config.train_split, data_config.query_split, data_config.database_split]
    loaded = _load_named_splits(data_config, sorted(set(names)))
    train = loaded[data_config.train_split]
    query = loaded[data_config.query_split]
    database = loaded[data_config.database_split]
    if train.class_names != query.class_names or train.class_names != database.class_names:
        raise DataLayoutError("the train, query and database splits have different class lists")

    validation = None
    if data_config.validation_fraction or data_config.validation_per_class:
        remaining, carved = carve_validation(
            train,
            fraction=float(data_config.validation_fraction),
            per_class=int(data_config.validation_per_class),
            seed=int(data_config.seed),
        )
        database_is_train = data_config.database_split == data_config.train_split
        validation = train.subset(carved, name=f"{train.name}[validation]")
        train = train.subset(remaining, name=f"{train.name}[train]")
        if database_is_train and not data_config.validation_in_database:
            database = train
        logging.info("Carved a validation split of %d images from %d", len(validation), len(remaining) + len(carved))

    logging.info(
        "Retrieval splits: train %d, query %d, database %d, validation %s, %d classes",
        len(train), len(query), len(database), "none" if validation is None else len(validation),
        train.num_classes,
    )
    return RetrievalSplits(train, query, database, validation, train.class_names)
