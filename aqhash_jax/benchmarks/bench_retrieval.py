"""Benchmark the retrieval core against NumPy and faiss on the same random codes.

  python -m aqhash_jax.benchmarks.bench_retrieval [--num-queries 1000] [--num-db 1000000]

Part 1, Hamming distance + top-k search (k = --topk) for every query against the database at 32 and
64 bits: this library's `hamming_topk` (jitted, chunked), NumPy (`np.bitwise_count` on XOR-ed
uint32 words, then `np.argpartition` on a (distance, index) key, in query blocks) and, when
faiss-cpu is importable, `faiss.IndexBinaryFlat`. Every row checks that its top-k distances equal
the library's (faiss breaks ties in its own order, so only distances are compared).

Part 2, mAP@all wall time on n x n query/database sets with 100 classes at 12 and 48 bits: the
tie-aware `retrieval_metrics`, its ranked mode, and a naive NumPy full-matrix stable-argsort mAP.

Times are wall-clock medians over --repeats runs after one untimed warm-up run on the first chunk
of queries, which compiles the JAX kernels for the chunk shape used in the timed runs. Prints a markdown table on stdout.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np
from absl import app, flags, logging

from aqhash_jax.retrieval import hamming_topk, pack_codes, retrieval_metrics, resolve_method
from aqhash_jax.retrieval.hamming import default_chunk_size
from aqhash_jax.retrieval.metrics import RANKED_BLOCK_ELEMENTS

_NUM_QUERIES = flags.DEFINE_integer("num-queries", 1000, "Queries for the top-k search benchmark.")
_NUM_DB = flags.DEFINE_integer("num-db", 1_000_000, "Database size for the top-k search benchmark.")
_TOPK = flags.DEFINE_integer("topk", 100, "k for the top-k search benchmark.")
_MAP_SIZES = flags.DEFINE_list("map-sizes", ["3000", "6000"], "Query and database sizes n for the mAP benchmark (n x n).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per measurement (median reported).")
_NUMPY_BLOCK = flags.DEFINE_integer("numpy-block", 32, "Queries per NumPy block, bounding its memory.")


def _time(function, repeats: int, warmup=None):
    """Run `warmup` (or `function`) once untimed, then return (median seconds, last result)."""
    result = (warmup or function)()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        durations.append(time.perf_counter() - start)
    return float(np.median(durations)), result


def numpy_topk(query_packed: np.ndarray, db_packed: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by (Hamming distance, database index) with np.bitwise_count, in blocks of queries."""
    num_db = db_packed.shape[0]
    k = min(k, num_db)
    distances = np.empty((query_packed.shape[0], k), dtype=np.int32)
    indices = np.empty((query_packed.shape[0], k), dtype=np.int32)
    for start in range(0, query_packed.shape[0], block):
        chunk = query_packed[start:start + block]
        distance = np.zeros((chunk.shape[0], num_db), dtype=np.int64)
        for word in range(chunk.shape[1]):
            distance += np.bitwise_count(chunk[:, None, word] ^ db_packed[None, :, word])
        key = distance * num_db + np.arange(num_db)
        candidates = np.argpartition(key, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(key, candidates, axis=1), axis=1)
        chosen = np.take_along_axis(candidates, order, axis=1)
        indices[start:start + block] = chosen
        distances[start:start + block] = np.take_along_axis(distance, chosen, axis=1)
    return distances, indices


def naive_map(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP@all with a full-matrix stable argsort (ties in database order), in float64."""
    code_length = query_codes.shape[1]
    distance = 0.5 * (code_length - query_codes.astype(np.float32) @ db_codes.astype(np.float32).T)
    order = np.argsort(distance, axis=1, kind="stable")
    relevant = (query_labels[:, None] == db_labels[None, :])
    relevant = np.take_along_axis(relevant, order, axis=1)
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    totals = relevant.sum(axis=1)
    average_precision = np.where(totals > 0, (precision * relevant).sum(axis=1) / np.maximum(totals, 1), 0.0)
    return float(average_precision.mean())


def _hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, JAX {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s))"


def bench_topk(rows: list, rng: np.random.Generator) -> None:
    try:
        import faiss
    except ImportError:
        faiss = None
        logging.warning("faiss is not installed; skipping the IndexBinaryFlat rows.")
    num_queries, num_db, k = _NUM_QUERIES.value, _NUM_DB.value, _TOPK.value
    repeats = _REPEATS.value

    for code_length in (32, 64):
        query_packed = pack_codes(rng.integers(0, 2, size=(num_queries, code_length), dtype=np.int8))
        db_packed = pack_codes(rng.integers(0, 2, size=(num_db, code_length), dtype=np.int8))
        shape = f"{num_queries} x {num_db:,}, {code_length} bits, k={k}"

        chunk = default_chunk_size(num_queries, num_db, len(jax.devices()))
        seconds, (reference_distances, _) = _time(
            lambda: hamming_topk(query_packed, db_packed, code_length, k, chunk_size=chunk), repeats,
            warmup=lambda: hamming_topk(query_packed[:chunk], db_packed, code_length, k, chunk_size=chunk),
        )
        rows.append(("top-k search", shape, f"aqhash_jax hamming_topk ({resolve_method('auto')})", seconds, num_queries / seconds, "reference"))

        seconds, (distances, _) = _time(lambda: numpy_topk(query_packed, db_packed, k, _NUMPY_BLOCK.value), repeats)
        same = "yes" if np.array_equal(distances, reference_distances) else "NO"
        rows.append(("top-k search", shape, "NumPy bitwise_count + argpartition", seconds, num_queries / seconds, same))

        if faiss is not None:
            index = faiss.IndexBinaryFlat(code_length)
            index.add(np.ascontiguousarray(db_packed).view(np.uint8))
            query_bytes = np.ascontiguousarray(query_packed).view(np.uint8)
            seconds, (distances, _) = _time(lambda: index.search(query_bytes, k), repeats)
            same = "yes" if np.array_equal(distances, reference_distances) else "NO"
            rows.append(("top-k search", shape, f"faiss IndexBinaryFlat ({faiss.omp_get_max_threads()} threads)", seconds, num_queries / seconds, same))


def bench_map(rows: list, rng: np.random.Generator) -> None:
    repeats = _REPEATS.value
    for size in (int(value) for value in _MAP_SIZES.value):
        for code_length in (12, 48):
            query_codes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(size, code_length))
            db_codes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(size, code_length))
            query_labels = rng.integers(0, 100, size=size)
            db_labels = rng.integers(0, 100, size=size)
            shape = f"{size:,} x {size:,}, {code_length} bits"

            chunk = default_chunk_size(size, size, len(jax.devices()))
            ranked_chunk = default_chunk_size(size, size, len(jax.devices()), RANKED_BLOCK_ELEMENTS)

            def run(ranking, chunk_size, rows_used=size):
                return retrieval_metrics(
                    query_codes[:rows_used], db_codes, query_labels[:rows_used], db_labels, ranking=ranking,
                    chunk_size=chunk_size,
                )

            seconds, tie_aware = _time(lambda: run("tie-aware", chunk), repeats, warmup=lambda: run("tie-aware", chunk, chunk))
            rows.append(("mAP@all", shape, "aqhash_jax tie-aware", seconds, size / seconds, f"mAP {tie_aware['map']:.5f}"))
            seconds, ranked = _time(
                lambda: run("ranked", ranked_chunk), repeats, warmup=lambda: run("ranked", ranked_chunk, ranked_chunk)
            )
            rows.append(("mAP@all", shape, "aqhash_jax ranked", seconds, size / seconds, f"mAP {ranked['map']:.5f}"))
            seconds, naive = _time(lambda: naive_map(query_codes, db_codes, query_labels, db_labels), repeats)
            agrees = "equal to ranked" if abs(naive - ranked["map"]) < 1e-5 else "DIFFERS from ranked"
            rows.append(("mAP@all", shape, "NumPy full-matrix stable argsort", seconds, size / seconds, f"mAP {naive:.5f}, {agrees}"))


def main(argv) -> None:
    del argv
    rng = np.random.default_rng(0)
    rows: list = []
    bench_topk(rows, rng)
    bench_map(rows, rng)

    print(f"Hardware: {_hardware()}")
    print()
    print("| task | shape | implementation | seconds | queries/s | check |")
    print("|---|---|---|---:|---:|---|")
    for task, shape, implementation, seconds, rate, check in rows:
        print(f"| {task} | {shape} | {implementation} | {seconds:.3f} | {rate:,.0f} | {check} |")


if __name__ == "__main__":
    app.run(main)
