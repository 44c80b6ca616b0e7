"""faiss binary indexes over exported codes, for galleries too large for an exact scan.

faiss is an optional dependency: `pip install "aqhash_jax[faiss]"` (or `pip install faiss-cpu`).
The exact scan of `aqhash_jax.retrieval.hamming_topk` never needs it.

Byte layout. faiss binary indexes take codes as uint8 [n, d / 8] with d a multiple of 8 and compare
them by popcount of XOR, so only a bit layout shared by queries and database matters for the
distances. `packed_to_bytes` still keeps the bit numbering of the packed uint32 words. Bit j of a
code goes to byte j // 8 at bit position j % 8 (least significant first). This is the
little-endian byte view of the words truncated to ceil(code_length / 8) bytes, and it equals
`np.packbits(bits, axis=1, bitorder="little")`. The words are converted to little-endian before the
byte view, so the layout does not depend on the host's byte order.

Code lengths that are not a multiple of 8 are padded with zero bits up to d = 8 * ceil(code_length
/ 8). The packed words already carry zero padding bits, and queries and database get the same
padding, so the padding adds nothing to any distance.

An index file `OUT.faiss` comes with a JSON sidecar `OUT.faiss.json` that records the index type,
its parameters, the code length, the row count and a sha256 of the packed codes it was built from,
so a search can check that the index and the code file belong together.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np
from absl import logging

from aqhash_jax.retrieval.codes import validate_packed

INDEX_TYPES = ("flat", "hnsw", "ivf")
INSTALL_COMMAND = 'pip install "aqhash_jax[faiss]"  (or: pip install faiss-cpu)'
INDEX_FORMAT_NAME = "aqhash_faiss_index"
INDEX_FORMAT_VERSION = 1

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 16
# faiss's k-means warns below 39 training points per list; 64 per list leaves a margin.
TRAIN_POINTS_PER_LIST = 64


class FaissMissingError(ImportError):
    """faiss is not installed; the message gives the install command."""


def import_faiss():
    """Import and return the faiss module, or raise FaissMissingError with the install command."""
    try:
        import faiss
    except ImportError as error:
        raise FaissMissingError(
            f"faiss is not installed, but faiss indexes need it; install it with {INSTALL_COMMAND}. "
            "The exact scan (without --index) works without faiss."
        ) from error
    return faiss


def faiss_dimension(code_length: int) -> int:
    """Return the faiss dimension in bits for a code length: the next multiple of 8."""
    if isinstance(code_length, bool) or not isinstance(code_length, (int, np.integer)) or code_length < 1:
        raise ValueError(f"code_length must be a positive int, got {code_length!r}.")
    return 8 * math.ceil(int(code_length) / 8)


def packed_to_bytes(packed, code_length: int) -> np.ndarray:
    """Convert packed uint32 codes to the uint8 rows faiss binary indexes take.

    Args:
      packed: uint32 [n, ceil(code_length / 32)] packed codes (bit j in word j // 32 at position j % 32).
      code_length: bits per code.

    Returns:
      C-contiguous uint8 [n, ceil(code_length / 8)]: bit j of a code in byte j // 8 at bit position
      j % 8, padding bits zero.
    """
    words = validate_packed(packed, code_length)
    little_endian = np.ascontiguousarray(words, dtype="<u4")
    code_bytes = little_endian.view(np.uint8).reshape(words.shape[0], -1)
    return np.ascontiguousarray(code_bytes[:, : faiss_dimension(code_length) // 8])


def bytes_to_packed(code_bytes, code_length: int) -> np.ndarray:
    """Invert `packed_to_bytes`: uint8 [n, ceil(code_length / 8)] to packed uint32 [n, ceil(code_length / 32)]."""
    values = np.asarray(code_bytes)
    num_bytes = faiss_dimension(code_length) // 8
    if values.dtype != np.uint8 or values.ndim != 2 or values.shape[1] != num_bytes:
        raise ValueError(
            f"code bytes for code length {code_length} must be uint8 [n, {num_bytes}], got {values.dtype} "
            f"{values.shape}."
        )
    num_words = -(-int(code_length) // 32)
    padded = np.zeros((values.shape[0], num_words * 4), dtype=np.uint8)
    padded[:, :num_bytes] = values
    words = padded.view("<u4").astype(np.uint32)
    return validate_packed(words, code_length)


def codes_digest(packed) -> str:
    """Return the sha256 hex digest of packed codes (little-endian uint32 bytes plus the shape)."""
    words = np.ascontiguousarray(packed, dtype="<u4")
    digest = hashlib.sha256(f"{words.shape[0]}x{words.shape[1]}:".encode())
    digest.update(words.tobytes())
    return digest.hexdigest()


def default_nlist(num_rows: int) -> int:
    """Return an IVF list count near sqrt(num_rows), with at least 64 training points per list."""
    return max(1, min(int(round(math.sqrt(num_rows))), num_rows // TRAIN_POINTS_PER_LIST))


def build_index(
    packed,
    code_length: int,
    index_type: str = "flat",
    *,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    nlist: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
):
    """Build a faiss binary index over packed codes.

    Args:
      packed: uint32 [n, ceil(code_length / 32)] packed database codes.
      code_length: bits per code.
      index_type: "flat" (exact, IndexBinaryFlat), "hnsw" (IndexBinaryHNSW graph) or "ivf"
        (IndexBinaryIVF with an IndexBinaryFlat coarse quantiser).
      hnsw_m: HNSW neighbours per node.
      ef_construction: HNSW candidate list size while building.
      nlist: IVF lists; None picks `default_nlist(n)`.
      train_size: IVF training rows drawn without replacement; None takes 64 per list.
      seed: seed of the training-row draw.

    Returns:
      The faiss index with all n codes added, row i under id i.
    """
    faiss = import_faiss()
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}.")
    code_bytes = packed_to_bytes(packed, code_length)
    num_rows = code_bytes.shape[0]
    if num_rows == 0:
        raise ValueError("cannot build an index over zero codes; encode some images first.")
    dimension = faiss_dimension(code_length)

    if index_type == "flat":
        index = faiss.IndexBinaryFlat(dimension)
    elif index_type == "hnsw":
        index = faiss.IndexBinaryHNSW(dimension, int(hnsw_m))
        index.hnsw.efConstruction = int(ef_construction)
    else:
        nlist = default_nlist(num_rows) if nlist is None else int(nlist)
        if not 1 <= nlist <= num_rows:
            raise ValueError(f"nlist must be in [1, {num_rows}] for {num_rows} codes, got {nlist}.")
        quantizer = faiss.IndexBinaryFlat(dimension)
        index = faiss.IndexBinaryIVF(quantizer, dimension, nlist)
        # With own_fields the index deletes the quantiser with itself, and disown stops Python from
        # deleting it earlier, so the quantiser lives exactly as long as the index.
        index.own_fields = True
        quantizer.this.disown()
        sample_size = min(num_rows, train_size or nlist * TRAIN_POINTS_PER_LIST)
        rows = np.random.default_rng(seed).choice(num_rows, size=sample_size, replace=False)
        index.train(code_bytes[np.sort(rows)])

    index.add(code_bytes)
    logging.info("Built a faiss %s index over %d codes of %d bits.", index_type, num_rows, code_length)
    return index


def index_type_of(index) -> str:
    """Return "flat", "hnsw" or "ivf" for a faiss binary index."""
    faiss = import_faiss()
    index = faiss.downcast_IndexBinary(index)
    if isinstance(index, faiss.IndexBinaryHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexBinaryIVF):
        return "ivf"
    if isinstance(index, faiss.IndexBinaryFlat):
        return "flat"
    raise ValueError(f"unsupported faiss index class {type(index).__name__}; build it with build-index.")


def search_index(
    index,
    query_packed,
    code_length: int,
    k: int,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search a faiss binary index with packed query codes.

    Args:
      index: from `build_index` or `load_index`.
      query_packed: uint32 [num_queries, ceil(code_length / 32)] packed query codes.
      code_length: bits per code; must match the index dimension after padding to bytes.
      k: results per query.
      nprobe: IVF lists to visit (ignored by other types); None keeps the index's setting.
      ef_search: HNSW candidate list size (ignored by other types); None keeps the index's setting.

    Returns:
      (distances int32, indices int64), each [num_queries, min(k, ntotal)], sorted by (distance,
      index). Slots the index could not fill (HNSW and IVF can return fewer than k) hold index -1
      and distance -1 at the end of the row.
    """
    faiss = import_faiss()
    index = faiss.downcast_IndexBinary(index)
    if index.d != faiss_dimension(code_length):
        raise ValueError(
            f"the index contains {index.d}-bit codes but the queries have code length {code_length} "
            f"({faiss_dimension(code_length)} bits after padding to bytes); use codes of the same model."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    k = min(int(k), int(index.ntotal))
    query_bytes = packed_to_bytes(query_packed, code_length)

    kind = index_type_of(index)
    if kind == "ivf" and nprobe is not None:
        index.nprobe = int(nprobe)
    if kind == "hnsw" and ef_search is not None:
        index.hnsw.efSearch = int(ef_search)
    distances, indices = index.search(query_bytes, k)

    distances = np.asarray(distances, dtype=np.int32)
    indices = np.asarray(indices, dtype=np.int64)
    # faiss orders ties in heap order; sort by (missing last, distance, index) for a stable output.
    missing = indices < 0
    order = np.lexsort((indices, distances, missing), axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    missing = indices < 0
    distances[missing] = -1
    return distances, indices


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_index(index, path: str | os.PathLike, *, code_length: int, codes_sha256: str, codes_path: str | None = None,
               fingerprint: str | None = None, params: dict | None = None) -> str:
    """Write the index to `path` and its JSON sidecar to `path + ".json"`, each atomically.

    Returns:
      The sidecar path.
    """
    faiss = import_faiss()
    path = os.fspath(path)
    index = faiss.downcast_IndexBinary(index)
    sidecar = {
        "format": INDEX_FORMAT_NAME,
        "format_version": INDEX_FORMAT_VERSION,
        "index_type": index_type_of(index),
        "code_length": int(code_length),
        "faiss_dimension": int(index.d),
        "num_rows": int(index.ntotal),
        "codes_sha256": codes_sha256,
        "codes_path": os.path.abspath(codes_path) if codes_path else None,
        "fingerprint": fingerprint,
        "params": params or {},
        "faiss_version": getattr(faiss, "__version__", "unknown"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # The index goes first, so a sidecar on disk never describes a missing index.
    _atomic_write(path, lambda temporary: faiss.write_index_binary(index, temporary))
    sidecar_path = path + ".json"
    text = json.dumps(sidecar, indent=1)

    def write_sidecar(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_write(sidecar_path, write_sidecar)
    logging.info("Wrote faiss %s index of %d codes to %s.", sidecar["index_type"], sidecar["num_rows"], path)
    return sidecar_path


def load_index(path: str | os.PathLike) -> tuple[Any, dict]:
    """Read an index written by `save_index`; return (index, sidecar dict).

    Raises:
      ValueError when the file or its sidecar is missing or they disagree.
    """
    faiss = import_faiss()
    path = os.fspath(path)
    sidecar_path = path + ".json"
    if not os.path.exists(path):
        raise ValueError(f"faiss index {path} not found; build it with `python -m aqhash_jax.search build-index`.")
    if not os.path.exists(sidecar_path):
        raise ValueError(f"faiss index {path} has no sidecar {sidecar_path}; rebuild it with build-index.")
    with open(sidecar_path, encoding="utf-8") as handle:
        metadata = json.load(handle)
    if metadata.get("format") != INDEX_FORMAT_NAME or metadata.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(
            f"sidecar {sidecar_path} has format {metadata.get('format')!r} version {metadata.get('format_version')!r}, "
            f"expected {INDEX_FORMAT_NAME!r} version {INDEX_FORMAT_VERSION}; rebuild the index with build-index."
        )
    # read_index_binary returns the concrete class and owns the C++ object. A downcast here would
    # create a second, non-owning wrapper that dangles once the first is collected.
    index = faiss.read_index_binary(path)
    if index.ntotal != metadata["num_rows"] or index.d != metadata["faiss_dimension"]:
        raise ValueError(
            f"faiss index {path} contains {index.ntotal} codes of {index.d} bits but its sidecar says "
            f"{metadata['num_rows']} of {metadata['faiss_dimension']}; rebuild the index with build-index."
        )
    return index, metadata


def check_index_matches(metadata: dict, packed, code_length: int, codes_path: str) -> None:
    """Raise ValueError unless the index sidecar describes exactly these packed codes."""
    if metadata["code_length"] != code_length:
        raise ValueError(
            f"the index was built from {metadata['code_length']}-bit codes but {codes_path} has code length "
            f"{code_length}; rebuild the index from {codes_path}."
        )
    if metadata["num_rows"] != np.asarray(packed).shape[0] or metadata["codes_sha256"] != codes_digest(packed):
        raise ValueError(
            f"the index was built from other codes than {codes_path} ({metadata['num_rows']} rows, built from "
            f"{metadata.get('codes_path')}); rebuild it with build-index after re-encoding."
        )


__all__ = [
    "INDEX_TYPES",
    "INSTALL_COMMAND",
    "FaissMissingError",
    "build_index",
    "bytes_to_packed",
    "check_index_matches",
    "codes_digest",
    "default_nlist",
    "faiss_dimension",
    "import_faiss",
    "index_type_of",
    "load_index",
    "packed_to_bytes",
    "save_index",
    "search_index",
]
