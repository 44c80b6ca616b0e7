"""Hamming-distance kernels on packed codes, chunked over queries and sharded over devices.

Two formulations give identical int32 distances:
- "popcount": XOR of the packed uint32 words, then `jax.lax.population_count`, summed over words.
- "matmul": codes unpacked to +/-1 on device and dist = (bits - q @ d.T) / 2. The +/-1 operands are
  exact in bfloat16 and float32, and the products accumulate in float32, so the result is an exact
  integer for code lengths up to 2**24.
"auto" picks popcount on the CPU backend and matmul on GPU and TPU, whose matrix units are faster.

Every driver here processes the query set in chunks of `chunk_size` rows, and each step builds one
[chunk_size, num_db] distance block, so memory is bounded by the chunk, not the query set. Each chunk is sharded on its query axis over
all of `jax.devices()` (a one-axis Mesh with NamedSharding) while the database is replicated, and
the query set is padded to a multiple of the chunk size, which is itself a multiple of the device
count. Only per-query results (histograms, top-k lists, sums) come back to the host.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aqhash_jax.retrieval.codes import WORD_BITS, num_words, pack_codes, to_bits, validate_packed

METHODS = ("auto", "popcount", "matmul")

# Elements of one [chunk, num_db] distance block per device that the default chunk size aims for
# (2**23 int32 values are 32 MiB). Intermediates of the metric kernels are a small multiple of it.
DEFAULT_BLOCK_ELEMENTS = 2**23


def resolve_method(method: str) -> str:
    """Return "popcount" or "matmul" for `method`, resolving "auto" by the default JAX backend."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method != "auto":
        return method
    return "popcount" if jax.default_backend() == "cpu" else "matmul"


def _matmul_dtype() -> jnp.dtype:
    # bfloat16 feeds the matrix units of GPUs and TPUs; XLA on CPU multiplies float32 faster.
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _unpack_signs(words: jax.Array, code_length: int, dtype) -> jax.Array:
    """Unpack uint32 [n, words] on device into +/-1 values of `dtype`, shape [n, code_length]."""
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits = (words[:, :, None] >> shifts) & jnp.uint32(1)
    bits = bits.reshape(words.shape[0], -1)[:, :code_length]
    return (2 * bits.astype(jnp.int32) - 1).astype(dtype)


def _distance_block(query_words: jax.Array, db_operand: jax.Array, code_length: int, method: str) -> jax.Array:
    """Return int32 [chunk, num_db] Hamming distances.

    `db_operand` is packed uint32 [num_db, words] for popcount, or +/-1 [num_db, code_length] for matmul.
    """
    if method == "popcount":
        distance = jnp.zeros((query_words.shape[0], db_operand.shape[0]), dtype=jnp.int32)
        for word in range(query_words.shape[1]):
            differing = query_words[:, None, word] ^ db_operand[None, :, word]
            distance = distance + jax.lax.population_count(differing).astype(jnp.int32)
        return distance

    query_signs = _unpack_signs(query_words, code_length, db_operand.dtype)
    dot = jnp.matmul(query_signs, db_operand.T, preferred_element_type=jnp.float32)
    return ((code_length - dot) * 0.5).astype(jnp.int32)


def _db_operand(db_words: jax.Array, code_length: int, method: str) -> jax.Array:
    if method == "popcount":
        return db_words
    return _unpack_signs(db_words, code_length, _matmul_dtype())


def _relevance_block(query_labels: jax.Array, db_labels: jax.Array) -> jax.Array:
    """Return bool [chunk, num_db]: single labels are equal, or packed multi-hot labels share a bit."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]
    shared = jnp.zeros((query_labels.shape[0], db_labels.shape[0]), dtype=jnp.bool_)
    for word in range(query_labels.shape[1]):
        shared = shared | ((query_labels[:, None, word] & db_labels[None, :, word]) != 0)
    return shared


def encode_labels(query_labels, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and return device-ready arrays.

    Args:
      query_labels: int [num_queries] single labels, or multi-hot bool / {0, 1} int [num_queries, L].
      db_labels: the same kind for the database, [num_db] or [num_db, L].

    Returns:
      (query, db): int32 [n] for single labels, or uint32 [n, ceil(L / 32)] packed multi-hot labels,
      for which two items are relevant when they share any label.
    """
    query = np.asarray(query_labels)
    db = np.asarray(db_labels)
    if query.ndim != db.ndim or query.ndim not in (1, 2):
        raise ValueError(
            f"labels must be int [n] single labels or multi-hot [n, num_labels] for both sets, got query "
            f"labels of shape {query.shape} and database labels of shape {db.shape}."
        )

    if query.ndim == 1:
        for name, labels in (("query", query), ("database", db)):
            if not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}.")
            if labels.size and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
                raise ValueError(f"{name} labels must fit in int32, found range [{labels.min()}, {labels.max()}].")
        return query.astype(np.int32), db.astype(np.int32)

    if query.shape[1] != db.shape[1]:
        raise ValueError(
            f"multi-hot labels must have the same number of labels, got {query.shape[1]} for the query set "
            f"and {db.shape[1]} for the database."
        )
    packed = []
    for name, labels in (("query", query), ("database", db)):
        if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"multi-hot {name} labels must be bool or {{0, 1}} integers, got dtype {labels.dtype}.")
        if labels.dtype != np.bool_ and labels.size and not np.isin(np.unique(labels), (0, 1)).all():
            raise ValueError(f"multi-hot {name} labels must contain only 0 and 1, found {np.unique(labels)[:8].tolist()}.")
        packed.append(pack_codes(labels.astype(np.bool_)))
    return packed[0], packed[1]


def query_mesh() -> Mesh:
    """Return a one-axis mesh named "query" over all of `jax.devices()`."""
    return Mesh(np.asarray(jax.devices()), ("query",))


def default_chunk_size(num_queries: int, num_db: int, num_devices: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Return a chunk size, a multiple of `num_devices`, that keeps each device near `block_elements`."""
    per_device = max(1, block_elements // max(1, num_db))
    per_device = min(per_device, -(-num_queries // num_devices))
    return max(1, per_device) * num_devices


@functools.lru_cache(maxsize=64)
def _compile_kernel(kernel: Callable[..., tuple], static_items: tuple, num_query_arrays: int, num_db_arrays: int, mesh: Mesh):
    """Return `kernel` jitted and shard_mapped: query arrays split on axis 0, database replicated.

    Each device runs the kernel on its own query rows with no communication, because every output
    row depends on one query only.
    """
    bound = functools.partial(kernel, **dict(static_items))
    query_spec = PartitionSpec("query")
    in_specs = (query_spec,) * num_query_arrays + (PartitionSpec(),) * num_db_arrays
    return jax.jit(jax.shard_map(bound, mesh=mesh, in_specs=in_specs, out_specs=query_spec, check_vma=False))


def run_chunked(
    kernel: Callable[..., tuple],
    query_arrays: Sequence[np.ndarray],
    db_arrays: Sequence[jax.Array | np.ndarray],
    *,
    num_db: int,
    chunk_size: int | None,
    static: dict | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[np.ndarray, ...]:
    """Apply `kernel(*query_chunk, *db_arrays, **static)` to query chunks; concatenate outputs on the host.

    Each query array has the query set on axis 0. Chunks are padded to `chunk_size` rows with zeros
    (padded rows are dropped from the outputs) and sharded on axis 0 over all devices; the database
    arrays are replicated. `kernel` must return a tuple of arrays with the chunk rows on axis 0, and
    `static` holds its hashable keyword arguments (code length, method, k).
    """
    num_queries = int(query_arrays[0].shape[0])
    if num_queries == 0:
        raise ValueError("the query set is empty; pass at least one query.")
    mesh = query_mesh()
    num_devices = mesh.devices.size
    if chunk_size is None:
        chunk_size = default_chunk_size(num_queries, num_db, num_devices, block_elements)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    chunk_size = -(-int(chunk_size) // num_devices) * num_devices

    query_sharding = NamedSharding(mesh, PartitionSpec("query"))
    replicated = NamedSharding(mesh, PartitionSpec())
    db_on_device = [jax.device_put(array, replicated) for array in db_arrays]
    static_items = tuple(sorted((static or {}).items()))
    compiled = _compile_kernel(kernel, static_items, len(query_arrays), len(db_arrays), mesh)

    num_chunks = -(-num_queries // chunk_size)
    logging.log_first_n(
        logging.INFO, "Hamming kernel: %d queries x %d database items in %d chunks of %d on %d devices.", 4,
        num_queries, num_db, num_chunks, chunk_size, num_devices,
    )
    pending = []
    for chunk_index in range(num_chunks):
        start = chunk_index * chunk_size
        chunk = []
        for array in query_arrays:
            block = np.asarray(array[start:start + chunk_size])
            if block.shape[0] < chunk_size:
                padding = np.zeros((chunk_size - block.shape[0],) + block.shape[1:], dtype=block.dtype)
                block = np.concatenate([block, padding])
            chunk.append(jax.device_put(block, query_sharding))
        # Dispatch is asynchronous, so the next chunk is queued while this one runs.
        pending.append(compiled(*chunk, *db_on_device))

    outputs = []
    for parts in zip(*pending):
        outputs.append(np.concatenate([np.asarray(part) for part in parts])[:num_queries])
    return tuple(outputs)


def _check_pair(query_packed, db_packed, code_length: int) -> tuple[np.ndarray, np.ndarray]:
    query = validate_packed(query_packed, code_length)
    db = validate_packed(db_packed, code_length)
    if query.shape[0] == 0 or db.shape[0] == 0:
        raise ValueError(
            f"query set and database must be non-empty, got {query.shape[0]} queries and {db.shape[0]} "
            "database items."
        )
    return query, db


def _distance_kernel(query_words, db_operand, *, code_length, method):
    return (_distance_block(query_words, db_operand, code_length, method),)


def hamming_distance(query_packed, db_packed, code_length: int, *, method: str = "auto", chunk_size: int | None = None) -> np.ndarray:
    """Compute the full Hamming-distance matrix. Use it for small sets; the metrics never build it.

    Args:
      query_packed: uint32 [num_queries, ceil(code_length / 32)] packed codes.
      db_packed: uint32 [num_db, ceil(code_length / 32)] packed codes.
      code_length: bits per code.
      method: "auto", "popcount" or "matmul"; all give identical integers.
      chunk_size: queries per device step, or None to size chunks automatically.

    Returns:
      int32 [num_queries, num_db].
    """
    query, db = _check_pair(query_packed, db_packed, code_length)
    method = resolve_method(method)
    db_operand = _db_operand(jnp.asarray(db), code_length, method)
    (distance,) = run_chunked(
        _distance_kernel, [query], [db_operand], num_db=db.shape[0], chunk_size=chunk_size,
        static={"code_length": code_length, "method": method},
    )
    return distance


def _topk_block(distance: jax.Array, k: int, code_length: int) -> tuple[jax.Array, jax.Array]:
    """Select the k nearest items per row, ties broken by lower database index, without a full sort.

    A per-row binary search over radii 0..code_length finds the threshold distance t at which the
    cumulative count reaches k. All items closer than t are taken, then items at distance t in
    index order until k are taken; the k picks are compacted and ordered by distance (stable).
    """
    rows = distance.shape[0]
    low = jnp.zeros(rows, dtype=jnp.int32)
    high = jnp.full(rows, code_length, dtype=jnp.int32)

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        enough = jnp.sum(distance <= middle[:, None], axis=1) >= k
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    steps = max(1, int(np.ceil(np.log2(code_length + 1))))
    threshold, _ = jax.lax.fori_loop(0, steps, halve, (low, high))

    closer = distance < threshold[:, None]
    num_closer = jnp.sum(closer, axis=1)
    at_threshold = distance == threshold[:, None]
    rank_at_threshold = jnp.cumsum(at_threshold, axis=1, dtype=jnp.int32)
    selected = closer | (at_threshold & (rank_at_threshold <= (k - num_closer)[:, None]))

    indices = jax.vmap(lambda mask: jnp.nonzero(mask, size=k)[0])(selected).astype(jnp.int32)
    picked = jnp.take_along_axis(distance, indices, axis=1)
    order = jnp.argsort(picked, axis=1, stable=True)
    return jnp.take_along_axis(picked, order, axis=1), jnp.take_along_axis(indices, order, axis=1)


def _topk_kernel(query_words, db_operand, *, code_length, method, k):
    distance = _distance_block(query_words, db_operand, code_length, method)
    return _topk_block(distance, k, code_length)


def hamming_topk(
    query_packed, db_packed, code_length: int, k: int, *, method: str = "auto", chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Find the k nearest database codes of every query by Hamming distance.

    Ties are broken by database index (lower first), so results do not depend on hardware.
    When k exceeds the database size, all num_db items are returned (k_out = min(k, num_db)).

    Args:
      query_packed: uint32 [num_queries, ceil(code_length / 32)] packed codes.
      db_packed: uint32 [num_db, ceil(code_length / 32)] packed codes.
      code_length: bits per code.
      k: number of neighbours, at least 1.
      method: "auto", "popcount" or "matmul".
      chunk_size: queries per device step, or None to size chunks automatically.

    Returns:
      (distances, indices): int32 [num_queries, k_out] each, sorted by (distance, index).
    """
    query, db = _check_pair(query_packed, db_packed, code_length)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    k = min(int(k), db.shape[0])
    method = resolve_method(method)
    db_operand = _db_operand(jnp.asarray(db), code_length, method)
    distances, indices = run_chunked(
        _topk_kernel, [query], [db_operand], num_db=db.shape[0], chunk_size=chunk_size,
        static={"code_length": code_length, "method": method, "k": k},
    )
    return distances, indices


def _histogram_block(distance: jax.Array, relevant: jax.Array, code_length: int) -> tuple[jax.Array, jax.Array]:
    """Return int32 [chunk, code_length + 1] counts and relevant counts per Hamming distance.

    One bincount over (row, relevance, distance) bins. On a 2-core AMD EPYC CPU (16 queries x 1M items,
    64 bits) it ran 19 times faster than summing a one-hot comparison.
    """
    rows = distance.shape[0]
    bins = code_length + 1
    flat_bin = distance + bins * relevant.astype(jnp.int32) + (2 * bins) * jnp.arange(rows, dtype=jnp.int32)[:, None]
    histogram = jnp.bincount(flat_bin.ravel(), length=rows * 2 * bins).reshape(rows, 2, bins).astype(jnp.int32)
    return histogram[:, 0] + histogram[:, 1], histogram[:, 1]


def _histogram_kernel(query_words, query_labels, db_operand, db_labels, *, code_length, method):
    distance = _distance_block(query_words, db_operand, code_length, method)
    relevant = _relevance_block(query_labels, db_labels)
    return _histogram_block(distance, relevant, code_length)


def distance_histograms(
    query_packed,
    db_packed,
    code_length: int,
    query_labels,
    db_labels,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Count database items and relevant database items at each Hamming distance, per query.

    Args:
      query_packed, db_packed: uint32 packed codes [n, ceil(code_length / 32)].
      code_length: bits per code.
      query_labels, db_labels: int [n] single labels or multi-hot [n, num_labels] (see `encode_labels`).
      method: "auto", "popcount" or "matmul".
      chunk_size: queries per device step, or None to size chunks automatically.

    Returns:
      (counts, relevant): int64 [num_queries, code_length + 1]; counts[i, d] is the number of database
      items at distance d from query i, relevant[i, d] the number of those that are relevant.
    """
    query, db = _check_pair(query_packed, db_packed, code_length)
    query_encoded, db_encoded = encode_labels(query_labels, db_labels)
    _check_label_rows(query, db, query_encoded, db_encoded)
    method = resolve_method(method)
    db_operand = _db_operand(jnp.asarray(db), code_length, method)
    counts, relevant = run_chunked(
        _histogram_kernel, [query, query_encoded], [db_operand, db_encoded], num_db=db.shape[0],
        chunk_size=chunk_size, static={"code_length": code_length, "method": method},
    )
    return counts.astype(np.int64), relevant.astype(np.int64)


def _check_label_rows(query, db, query_labels, db_labels) -> None:
    if query_labels.shape[0] != query.shape[0]:
        raise ValueError(f"got {query_labels.shape[0]} query labels for {query.shape[0]} query codes.")
    if db_labels.shape[0] != db.shape[0]:
        raise ValueError(f"got {db_labels.shape[0]} database labels for {db.shape[0]} database codes.")


def prepare_codes(codes, code_length: int | None, name: str) -> tuple[np.ndarray, int]:
    """Return (packed uint32 codes, code length) from raw {-1,+1}/{0,1}/bool codes or packed uint32.

    Packed input needs an explicit `code_length`; raw input infers it, and a given one must match.
    """
    values = np.asarray(codes)
    if values.dtype == np.uint32:
        if code_length is None:
            raise ValueError(
                f"{name} codes are packed uint32 words, so pass code_length= (bits per code); it cannot be "
                "inferred from the word count."
            )
        return validate_packed(values, code_length), int(code_length)
    bits = to_bits(values)
    if code_length is not None and bits.shape[1] != code_length:
        raise ValueError(f"{name} codes have {bits.shape[1]} bits but code_length={code_length} was passed.")
    return pack_codes(bits), bits.shape[1]


__all__ = [
    "METHODS",
    "distance_histograms",
    "encode_labels",
    "hamming_distance",
    "hamming_topk",
    "num_words",
    "prepare_codes",
    "query_mesh",
    "resolve_method",
    "run_chunked",
]
