"""Code files: packed codes as `.npy` with a JSON sidecar, written atomically and validated on load.

A code file `codes.npy` holds uint32 [num_rows, ceil(code_length / 32)] words packed as in
`aqhash_jax.retrieval.codes` (bit j in word j // 32 at position j % 32, +1 stored as 1, zero
padding). Its sidecar `codes.npy.json` records the format version, code length, bit order, packing,
dtype, row count, optional ids, image paths, labels, split name, model/config fingerprint, creation
time (UTC, ISO 8601) and free-form `extra` fields.

Labels with at most INLINE_LABEL_LIMIT values are stored in the sidecar (`labels`); larger label
arrays go to `codes.npy.labels.npy`, named in the sidecar as `labels_file` (a path relative to the
sidecar's folder).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np
from absl import logging

from aqhash_jax.retrieval.codes import num_words, unpack_codes, validate_packed
from aqhash_jax.retrieval.hamming import prepare_codes

FORMAT_NAME = "aqhash_codes"
FORMAT_VERSION = 1
BIT_ORDER = "lsb_first"
PACKING = "uint32 words; bit j of a code in word j // 32 at bit position j % 32; +1 stored as 1; padding bits 0"
INLINE_LABEL_LIMIT = 100_000


@dataclasses.dataclass
class CodeFile:
    """Codes loaded by `load_codes`.

    Attributes:
      path: the `.npy` path the codes came from.
      packed: uint32 [num_rows, ceil(code_length / 32)] packed codes.
      code_length: bits per code.
      metadata: the parsed JSON sidecar.
      labels: int [num_rows] or multi-hot [num_rows, num_labels] labels, or None when not stored.
    """

    path: str
    packed: np.ndarray
    code_length: int
    metadata: dict
    labels: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    @property
    def ids(self) -> list | None:
        return self.metadata.get("ids")

    @property
    def paths(self) -> list | None:
        return self.metadata.get("paths")

    @property
    def split(self) -> str | None:
        return self.metadata.get("split")

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("fingerprint")

    def signs(self) -> np.ndarray:
        """Return the codes as int8 [num_rows, code_length] in {-1, +1}."""
        return unpack_codes(self.packed, self.code_length)


def _json_default(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON serialisable")


def compute_fingerprint(obj: bytes | str | dict | list) -> str:
    """Return the sha256 hex digest of bytes, a str (UTF-8) or a JSON-serialisable dict or list.

    Dicts are serialised with sorted keys and no whitespace, so equal configs give equal
    fingerprints regardless of key order. NumPy arrays and scalars inside are converted to lists
    and Python numbers.
    """
    if isinstance(obj, (bytes, bytearray, memoryview)):
        payload = bytes(obj)
    elif isinstance(obj, str):
        payload = obj.encode("utf-8")
    elif isinstance(obj, (dict, list, tuple)):
        try:
            payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode("utf-8")
        except TypeError as error:
            raise ValueError(f"cannot fingerprint {type(obj).__name__}: {error}; pass bytes or plain data.") from error
    else:
        raise ValueError(f"compute_fingerprint takes bytes, str, dict or list, got {type(obj).__name__}.")
    return hashlib.sha256(payload).hexdigest()


def _atomic_write_bytes(path: str, write) -> None:
    """Call write(file) on a temporary file in the folder of `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise


def _check_row_list(name: str, values, num_rows: int) -> list | None:
    if values is None:
        return None
    as_list = np.asarray(values).tolist() if isinstance(values, np.ndarray) else list(values)
    if len(as_list) != num_rows:
        raise ValueError(f"{name} has {len(as_list)} entries but there are {num_rows} codes; pass one per row.")
    return as_list


def _check_labels(labels, num_rows: int) -> np.ndarray | None:
    if labels is None:
        return None
    array = np.asarray(labels)
    if array.ndim not in (1, 2) or array.shape[0] != num_rows:
        raise ValueError(
            f"labels must have shape [{num_rows}] or [{num_rows}, num_labels], got shape {array.shape}."
        )
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer or boolean, got dtype {array.dtype}.")
    return array


def save_codes(
    path: str | os.PathLike,
    codes,
    *,
    code_length: int | None = None,
    ids=None,
    paths=None,
    labels=None,
    split: str | None = None,
    fingerprint: str | None = None,
    extra: dict | None = None,
) -> str:
    """Write packed codes to `path` (.npy) and their JSON sidecar to `path + ".json"`, atomically.

    Args:
      path: destination ending in ".npy".
      codes: [n, bits] int/bool codes in {-1, +1} or {0, 1}, or packed uint32 [n, words] together
        with `code_length`.
      code_length: bits per code; required for packed input.
      ids: optional n ids (ints or strings).
      paths: optional n image paths.
      labels: optional int [n] or multi-hot [n, num_labels] labels.
      split: optional split name, for example "query" or "database".
      fingerprint: optional model and config fingerprint (see `compute_fingerprint`).
      extra: optional JSON-serialisable dict stored under "extra".

    Returns:
      The sidecar path.
    """
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise ValueError(f"code file path must end with .npy, got {path!r}.")
    packed, length = prepare_codes(codes, code_length, "exported")
    num_rows = int(packed.shape[0])
    label_array = _check_labels(labels, num_rows)

    sidecar = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "code_length": length,
        "bit_order": BIT_ORDER,
        "packing": PACKING,
        "dtype": "uint32",
        "num_rows": num_rows,
        "num_words": num_words(length),
        "ids": _check_row_list("ids", ids, num_rows),
        "paths": _check_row_list("paths", paths, num_rows),
        "split": split,
        "fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }

    if label_array is not None and label_array.size <= INLINE_LABEL_LIMIT:
        sidecar["labels"] = label_array.astype(np.int64).tolist()
    elif label_array is not None:
        labels_path = path + ".labels.npy"
        _atomic_write_bytes(labels_path, lambda handle: np.save(handle, label_array, allow_pickle=False))
        sidecar["labels_file"] = os.path.basename(labels_path)
    try:
        sidecar_text = json.dumps(sidecar, indent=1, default=_json_default)
    except TypeError as error:
        raise ValueError(f"metadata for {path} is not JSON serialisable: {error}.") from error

    # The sidecar goes last, so a sidecar on disk always describes a complete array.
    _atomic_write_bytes(path, lambda handle: np.save(handle, np.ascontiguousarray(packed), allow_pickle=False))
    sidecar_path = path + ".json"
    _atomic_write_bytes(sidecar_path, lambda handle: handle.write(sidecar_text.encode("utf-8")))
    logging.info("Wrote %d codes of %d bits to %s.", num_rows, length, path)
    return sidecar_path


def _invalid(path: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"invalid code file {path}: {problem}; {fix}")


def load_codes(path: str | os.PathLike) -> CodeFile:
    """Load a code file written by `save_codes` and validate the sidecar against the array.

    Raises:
      ValueError naming the file, the value found and the fix when the sidecar is missing or
      unreadable, or when the array's dtype, row count or word count disagrees with it.
    """
    path = os.fspath(path)
    sidecar_path = path + ".json"
    if not os.path.exists(sidecar_path):
        raise _invalid(path, f"sidecar {sidecar_path} not found", "write codes with save_codes, or pass the raw [n, bits] array")
    try:
        with open(sidecar_path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise _invalid(path, f"cannot read sidecar {sidecar_path} ({error})", "rewrite it with save_codes") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _invalid(path, f"sidecar format is {metadata.get('format') if isinstance(metadata, dict) else metadata!r}, expected {FORMAT_NAME!r}", "rewrite it with save_codes")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _invalid(path, f"format_version is {metadata.get('format_version')!r}, this reader supports {FORMAT_VERSION}", "re-export the codes with this version")
    if metadata.get("bit_order") != BIT_ORDER:
        raise _invalid(path, f"bit_order is {metadata.get('bit_order')!r}, expected {BIT_ORDER!r}", "re-export the codes with save_codes")

    code_length = metadata.get("code_length")
    if isinstance(code_length, bool) or not isinstance(code_length, int) or code_length < 1:
        raise _invalid(path, f"code_length in the sidecar is {code_length!r}", "set it to the number of bits per code")

    try:
        packed = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _invalid(path, f"cannot read the array ({error})", "re-export the codes with save_codes") from error
    if packed.dtype != np.uint32:
        raise _invalid(path, f"array dtype is {packed.dtype}, expected uint32", "pack the codes with pack_codes before saving")
    if packed.ndim != 2:
        raise _invalid(path, f"array has shape {packed.shape}, expected [num_rows, num_words]", "re-export the codes")
    if packed.shape[0] != metadata.get("num_rows"):
        raise _invalid(path, f"array has {packed.shape[0]} rows but the sidecar says num_rows={metadata.get('num_rows')}", "re-export codes and sidecar together")
    if packed.shape[1] != num_words(code_length):
        raise _invalid(
            path,
            f"array has {packed.shape[1]} words per row but code_length={code_length} needs {num_words(code_length)}",
            "fix code_length in the sidecar or re-export the codes",
        )
    try:
        validate_packed(packed, code_length)
    except ValueError as error:
        raise _invalid(path, str(error).rstrip("."), "fix code_length in the sidecar") from error

    for key in ("ids", "paths"):
        values = metadata.get(key)
        if values is not None and len(values) != packed.shape[0]:
            raise _invalid(path, f"sidecar has {len(values)} {key} for {packed.shape[0]} rows", f"store one entry of {key} per row")

    labels = _load_labels(path, metadata, packed.shape[0])
    return CodeFile(path=path, packed=packed, code_length=code_length, metadata=metadata, labels=labels)


def _load_labels(path: str, metadata: dict, num_rows: int) -> np.ndarray | None:
    if metadata.get("labels") is not None:
        labels = np.asarray(metadata["labels"], dtype=np.int64)
    elif metadata.get("labels_file"):
        labels_path = os.path.join(os.path.dirname(os.path.abspath(path)), metadata["labels_file"])
        if not os.path.exists(labels_path):
            raise _invalid(path, f"labels file {labels_path} not found", "copy it next to the codes or re-export")
        labels = np.load(labels_path, allow_pickle=False)
    else:
        return None
    if labels.ndim not in (1, 2) or labels.shape[0] != num_rows:
        raise _invalid(path, f"labels have shape {labels.shape} for {num_rows} rows", "store one label (or label row) per code")
    return labels


def check_compatible(query: CodeFile, db: CodeFile) -> None:
    """Raise ValueError when query and database codes cannot be compared (different code lengths).

    Different model fingerprints are logged as a warning, because codes from two models are
    comparable in shape but usually meaningless together.
    """
    if query.code_length != db.code_length:
        raise ValueError(
            f"query codes {query.path} have code length {query.code_length} but database codes {db.path} have "
            f"{db.code_length}; encode both with the same model."
        )
    if query.fingerprint and db.fingerprint and query.fingerprint != db.fingerprint:
        logging.warning(
            "Query codes %s and database codes %s have different fingerprints (%s vs %s).",
            query.path, db.path, query.fingerprint[:12], db.fingerprint[:12],
        )
