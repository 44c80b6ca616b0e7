"""Measure recall of faiss HNSW and IVF binary indexes against the exact Hamming scan.

  python -m aqhash_jax.benchmarks.bench_faiss [--num-db 1000000] [--num-queries 1000] \\
      [--code-length 64] [--hnsw-num-db 1000000] [--out /tmp/bench_faiss.md]

Data: --num-db database codes and --num-queries query codes drawn around --num-clusters random
centres, each bit flipped with probability --flip-probability, so that near neighbours share a
centre. The exact top-k (k = --topk) comes from `faiss.IndexBinaryFlat`, a brute-force scan. On a
loaded 2-core CPU `hamming_topk` ran 64 queries against 1M codes in 12 s, so all 1000 queries would
take about 3 minutes (an estimate). It runs on the first --check-queries queries only, and the
benchmark stops unless its distances equal the flat index's.

Recall is reported two ways, because Hamming distances have many ties:
- id recall@k: |returned rows ∩ exact rows| / k, with the exact list breaking ties by lowest row.
  A correct index can score below 1 here by returning other members of the last tie group.
- tie-aware recall@k: sum over distances d of min(returned at d, exact at d) / k. It is the id
  recall under the tie order most favourable to the index, and 1 exactly when the returned
  distances equal the exact ones.

HNSW is built on the first --hnsw-num-db codes, because its build is the slowest step, and is
compared with an exact scan over the same rows. With the defaults (HNSW on all 1M codes, IVF
trained on 40,960 codes, 40 per list) one run took 218 s on a shared 2-core AMD EPYC with a load
average near 10, 160 s of it for the HNSW build; --hnsw-num-db 250000 cuts that build to about 40 s.
Times are wall-clock seconds of one run, and the first JAX call is an untimed compile warm-up.
The report is printed as markdown and written to --out.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np
from absl import app, flags, logging

from aqhash_jax import faiss_index
from aqhash_jax.retrieval import hamming_topk, pack_codes

_NUM_DB = flags.DEFINE_integer("num-db", 1_000_000, "Database codes.")
_NUM_QUERIES = flags.DEFINE_integer("num-queries", 1000, "Query codes.")
_CODE_LENGTH = flags.DEFINE_integer("code-length", 64, "Bits per code.")
_NUM_CLUSTERS = flags.DEFINE_integer("num-clusters", 1000, "Cluster centres the codes are drawn around.")
_FLIP = flags.DEFINE_float("flip-probability", 0.1, "Probability that a code bit differs from its centre.")
_TOPK = flags.DEFINE_integer("topk", 10, "k of recall@k.")
_CHECK_QUERIES = flags.DEFINE_integer("check-queries", 64, "Queries also searched with hamming_topk to check the flat index.")
_NLIST = flags.DEFINE_integer("nlist", 1024, "IVF lists.")
_IVF_TRAIN_SIZE = flags.DEFINE_integer("ivf-train-size", 40960, "Codes drawn to train the IVF coarse quantiser.")
_NPROBES = flags.DEFINE_list("nprobes", ["1", "4", "16", "64"], "IVF lists visited per query, one row each.")
_HNSW_M = flags.DEFINE_integer("hnsw-m", 16, "HNSW neighbours per node.")
_EF_CONSTRUCTION = flags.DEFINE_integer("ef-construction", 32, "HNSW candidate list size while building.")
_EF_SEARCHES = flags.DEFINE_list("ef-searches", ["16", "64", "256"], "HNSW candidate list sizes, one row each.")
_HNSW_NUM_DB = flags.DEFINE_integer("hnsw-num-db", 1_000_000, "Database codes for HNSW (the first rows); 0 skips HNSW.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated codes.")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report to this file.")


def clustered_codes(rng: np.random.Generator, centres: np.ndarray, num_rows: int, flip: float) -> np.ndarray:
    """Return packed uint32 codes: random centres (bool [C, bits]) with bits flipped at rate `flip`."""
    code_length = centres.shape[1]
    packed = []
    # Blocks bound the bool intermediates to about 64 MiB.
    block = max(1, 2**26 // code_length)
    for start in range(0, num_rows, block):
        rows = min(block, num_rows - start)
        bits = centres[rng.integers(0, centres.shape[0], rows)] ^ (rng.random((rows, code_length)) < flip)
        packed.append(pack_codes(bits))
    return np.concatenate(packed)


def recall(exact_distances, exact_indices, distances, indices, k: int) -> tuple[float, float]:
    """Return (id recall@k, tie-aware recall@k) averaged over queries; see the module docstring."""
    id_hits = 0
    tie_hits = 0
    for row in range(exact_indices.shape[0]):
        returned = indices[row][indices[row] >= 0]
        id_hits += np.intersect1d(returned, exact_indices[row]).size
        exact_counts = np.bincount(exact_distances[row], minlength=1)
        found = distances[row][indices[row] >= 0]
        found_counts = np.bincount(found, minlength=exact_counts.size) if found.size else np.zeros(1, np.int64)
        size = max(exact_counts.size, found_counts.size)
        tie_hits += np.minimum(np.pad(exact_counts, (0, size - exact_counts.size)),
                               np.pad(found_counts, (0, size - found_counts.size))).sum()
    total = exact_indices.shape[0] * k
    return id_hits / total, tie_hits / total


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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}, {os.cpu_count()} logical cores (1-minute load average {load:.1f} at the end of the run), "
        f"JAX {jax.__version__} on {jax.default_backend()}"
    )


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def _exact(queries, db, code_length, k):
    """Return (seconds, (distances, indices)) of an IndexBinaryFlat search (ties by lowest row)."""
    flat = faiss_index.build_index(db, code_length, "flat")
    return _timed(lambda: faiss_index.search_index(flat, queries, code_length, k))


def run_benchmark() -> tuple[list[tuple], dict]:
    """Generate the codes, build every index and return (table rows, settings)."""
    faiss = faiss_index.import_faiss()
    rng = np.random.default_rng(_SEED.value)
    code_length, k = _CODE_LENGTH.value, _TOPK.value
    centres = rng.random((_NUM_CLUSTERS.value, code_length)) < 0.5
    generate_seconds, db = _timed(lambda: clustered_codes(rng, centres, _NUM_DB.value, _FLIP.value))
    queries = clustered_codes(rng, centres, _NUM_QUERIES.value, _FLIP.value)
    logging.info("Generated %d database and %d query codes in %.1f s.", db.shape[0], queries.shape[0], generate_seconds)
    num_queries = queries.shape[0]
    rows = []

    exact_seconds, (exact_d, exact_i) = _exact(queries, db, code_length, k)
    rows.append(("faiss IndexBinaryFlat (exact reference)", f"{db.shape[0]:,}", "-", "-", exact_seconds,
                 num_queries / exact_seconds, 1.0, 1.0))

    check = queries[: _CHECK_QUERIES.value]
    # A fixed chunk size lets an untimed call on the first chunk compile the kernel the timed call uses.
    chunk_size = 8 * jax.device_count()
    hamming_topk(check[:chunk_size], db, code_length, k, chunk_size=chunk_size)
    check_seconds, (check_d, check_i) = _timed(lambda: hamming_topk(check, db, code_length, k, chunk_size=chunk_size))
    if not np.array_equal(check_d, exact_d[: check.shape[0]]):
        raise AssertionError("hamming_topk distances differ from IndexBinaryFlat's; check the byte conversion.")
    rows.append(("exact scan (hamming_topk)", f"{db.shape[0]:,}", f"first {check.shape[0]} queries", "-", check_seconds,
                 check.shape[0] / check_seconds,
                 *recall(exact_d[: check.shape[0]], exact_i[: check.shape[0]], check_d, check_i, k)))

    nlist = _NLIST.value
    build_seconds, ivf = _timed(lambda: faiss_index.build_index(
        db, code_length, "ivf", nlist=nlist, train_size=_IVF_TRAIN_SIZE.value, seed=_SEED.value
    ))
    for nprobe in map(int, _NPROBES.value):
        search_seconds, (ivf_d, ivf_i) = _timed(
            lambda: faiss_index.search_index(ivf, queries, code_length, k, nprobe=nprobe)
        )
        rows.append((f"faiss IndexBinaryIVF nlist={nlist}", f"{db.shape[0]:,}", f"nprobe={nprobe}", f"{build_seconds:.1f}",
                     search_seconds, num_queries / search_seconds, *recall(exact_d, exact_i, ivf_d, ivf_i, k)))
    del ivf

    hnsw_rows = min(_HNSW_NUM_DB.value, db.shape[0])
    if hnsw_rows > 0:
        hnsw_db = db[:hnsw_rows]
        if hnsw_rows == db.shape[0]:
            subset_d, subset_i = exact_d, exact_i
        else:
            _, (subset_d, subset_i) = _exact(queries, hnsw_db, code_length, k)
        build_seconds, hnsw = _timed(lambda: faiss_index.build_index(
            hnsw_db, code_length, "hnsw", hnsw_m=_HNSW_M.value, ef_construction=_EF_CONSTRUCTION.value
        ))
        for ef_search in map(int, _EF_SEARCHES.value):
            search_seconds, (hnsw_d, hnsw_i) = _timed(
                lambda: faiss_index.search_index(hnsw, queries, code_length, k, ef_search=ef_search)
            )
            rows.append((f"faiss IndexBinaryHNSW M={_HNSW_M.value} efConstruction={_EF_CONSTRUCTION.value}",
                         f"{hnsw_rows:,}", f"efSearch={ef_search}", f"{build_seconds:.1f}", search_seconds,
                         num_queries / search_seconds, *recall(subset_d, subset_i, hnsw_d, hnsw_i, k)))

    settings = {
        "faiss": getattr(faiss, "__version__", "unknown"),
        "faiss_threads": faiss.omp_get_max_threads(),
        "generate_seconds": generate_seconds,
    }
    return rows, settings


def format_report(rows: list[tuple], settings: dict, total_seconds: float) -> str:
    command = (
        f"python -m aqhash_jax.benchmarks.bench_faiss --num-db {_NUM_DB.value} --num-queries {_NUM_QUERIES.value} "
        f"--code-length {_CODE_LENGTH.value} --num-clusters {_NUM_CLUSTERS.value} --flip-probability {_FLIP.value} "
        f"--topk {_TOPK.value} --nlist {_NLIST.value} --hnsw-m {_HNSW_M.value} --ef-construction {_EF_CONSTRUCTION.value} "
        f"--hnsw-num-db {_HNSW_NUM_DB.value} --ivf-train-size {_IVF_TRAIN_SIZE.value} --check-queries {_CHECK_QUERIES.value}"
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Hardware: {_hardware()}; faiss {settings['faiss']} with {settings['faiss_threads']} OpenMP threads.",
        f"Whole run: {total_seconds:.0f} s.",
        "",
        f"Data: {_NUM_DB.value:,} database and {_NUM_QUERIES.value:,} query codes of {_CODE_LENGTH.value} bits around "
        f"{_NUM_CLUSTERS.value} random centres, bits flipped with probability {_FLIP.value}; recall@{_TOPK.value} "
        "against the exact scan over the same database rows.",
        "",
        f"| method | database | search setting | build s | search s | queries/s | id recall@{_TOPK.value} | tie-aware recall@{_TOPK.value} |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for method, size, setting, build, seconds, rate, id_recall, tie_recall in rows:
        lines.append(
            f"| {method} | {size} | {setting} | {build} | {seconds:.2f} | {rate:,.0f} | {id_recall:.3f} | {tie_recall:.3f} |"
        )
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    start = time.perf_counter()
    rows, settings = run_benchmark()
    report = format_report(rows, settings, time.perf_counter() - start)
    print(report)
    if _OUT.value:
        temporary = _OUT.value + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(report + "\n")
        os.replace(temporary, _OUT.value)


if __name__ == "__main__":
    app.run(main)
