"""Retrieval metrics for binary codes ranked by Hamming distance.

Two ranking modes:

- "tie-aware" (default): every metric is its expected value when the database items at equal
  Hamming distance are ranked in a uniformly random order. Short codes put thousands of items at
  each distance (a 12-bit code has 13 distances), so any fixed tie order moves mAP by whole points;
  the expectation does not depend on database order. It is computed exactly, in float64 on the
  host, from per-query histograms built on device (`distance_histograms`): counts[d] = number of
  database items at distance d, relevant[d] = number of relevant ones. No sort is needed.
- "ranked": the sort-based definition used by most published hashing code. Each query ranks the
  whole database by a stable sort on distance (ties in database order, no item dropped), and AP,
  AP@k, precision@k and recall@k are read from that order. Use it to compare with published
  numbers; its results depend on database order. The per-query precision sums run on device in
  float32 with pairwise summation (relative error estimated at log2(num_db) * 6e-8).

Shared conventions (both modes):
- Relevance: single labels are relevant when equal; multi-hot labels when they share any label.
- A query with no relevant database item has AP = AP@k = recall@k = 0 and stays in every mean
  (as in the common sort-based code, which skips it but divides by the number of queries).
  `num_queries_without_relevant` reports how many there are.
- mAP@k normalises by min(k, R), R the number of relevant database items of the query. Some
  published code divides by the number of relevant items inside the top k instead, which is larger
  whenever the top k misses relevant items that exist.
- precision@k divides by min(k, num_db), so it is the precision of the returned list when k
  exceeds the database size.
- Precision within Hamming radius r and the PR curve use the set of items at distance <= r, which
  does not depend on tie order. A query with nothing inside the radius has precision 0
  (`num_queries_empty_radius` counts them); recall is 0 for a query without relevant items.

Closed form of the tie-aware AP. Sort the distances and take one tie group: n items, r of them
relevant, with N items and R_b relevant items ranked before it. A relevant item of the group lands
at group position p (1..n) with probability 1/n; given p, the other r - 1 relevant items fill the
p - 1 earlier group slots at rate b = (r - 1) / (n - 1) (b = 0 when n = 1), so the expected number
of relevant items up to and including it is R_b + 1 + b (p - 1), over a fixed rank N + p. By
linearity of expectation the group's expected sum of precisions at its relevant items is

    E_group = (r / n) * sum_{p=1..n} (R_b + 1 + b (p - 1)) / (N + p)
            = r b + (r / n) (R_b + 1 - b (N + 1)) (H(N + n) - H(N)),

with H(m) = 1 + 1/2 + ... + 1/m. AP = sum over groups of E_group / R_total. Truncating at k keeps
positions p <= m = clip(k - N, 0, n): E_group@k = (r / n) [m b + (R_b + 1 - b (N + 1))
(H(N + m) - H(N))], and AP@k = sum of E_group@k / min(k, R_total). The expected number of relevant
items in the top k is sum over groups of r m / n, which gives precision@k and recall@k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aqhash_jax.retrieval.hamming import (
    _check_label_rows,
    _check_pair,
    _db_operand,
    _distance_block,
    _histogram_block,
    _relevance_block,
    distance_histograms,
    encode_labels,
    prepare_codes,
    resolve_method,
    run_chunked,
)

RANKINGS = ("tie-aware", "ranked")

# The ranked mode sorts each [chunk, num_db] block, which needs several times the block in scratch.
RANKED_BLOCK_ELEMENTS = 2**21


def harmonic_numbers(max_n: int) -> np.ndarray:
    """Return float64 [max_n + 1] with H[0] = 0 and H[m] = 1 + 1/2 + ... + 1/m."""
    harmonic = np.zeros(max_n + 1, dtype=np.float64)
    harmonic[1:] = np.cumsum(1.0 / np.arange(1, max_n + 1, dtype=np.float64))
    return harmonic


def _expected_group_precision_sums(counts, relevant, cutoff, harmonic):
    """Return float64 [nq, bins]: expected sum of precisions at relevant items of each tie group,
    counting only items ranked within the first `cutoff` positions (see the module docstring)."""
    n = counts.astype(np.float64)
    r = relevant.astype(np.float64)
    before = np.cumsum(counts, axis=1) - counts
    relevant_before = (np.cumsum(relevant, axis=1) - relevant).astype(np.float64)

    taken = np.clip(cutoff - before, 0, counts)
    safe_n = np.maximum(n, 1.0)
    rate = np.where(n > 1, (r - 1.0) / np.maximum(n - 1.0, 1.0), 0.0)
    harmonic_span = harmonic[before + taken] - harmonic[before]
    group_sums = (r / safe_n) * (taken * rate + (relevant_before + 1.0 - rate * (before + 1.0)) * harmonic_span)
    return np.where(relevant > 0, group_sums, 0.0)


def _expected_relevant_in_top(counts, relevant, cutoff):
    before = np.cumsum(counts, axis=1) - counts
    taken = np.clip(cutoff - before, 0, counts)
    return (relevant * taken / np.maximum(counts, 1)).sum(axis=1)


def radius_metrics(counts: np.ndarray, relevant: np.ndarray, radius: int) -> dict:
    """Compute the PR curve over Hamming radius and the precision within `radius` from histograms.

    Args:
      counts, relevant: int [num_queries, code_length + 1] per-distance histograms.
      radius: Hamming radius in [0, code_length].

    Returns:
      dict with `pr_curve` ({"radius", "precision", "recall"} lists over r = 0..code_length, means over
      queries), `precision_within_radius` (mean) and `num_queries_empty_radius`.
    """
    within = np.cumsum(counts, axis=1)
    relevant_within = np.cumsum(relevant, axis=1)
    total_relevant = relevant_within[:, -1:]

    precision = np.where(within > 0, relevant_within / np.maximum(within, 1), 0.0)
    recall = np.where(total_relevant > 0, relevant_within / np.maximum(total_relevant, 1), 0.0)
    return {
        "pr_curve": {
            "radius": list(range(counts.shape[1])),
            "precision": precision.mean(axis=0).tolist(),
            "recall": recall.mean(axis=0).tolist(),
        },
        "precision_within_radius": float(precision[:, radius].mean()),
        "num_queries_empty_radius": int((within[:, radius] == 0).sum()),
    }


def tie_aware_metrics(counts: np.ndarray, relevant: np.ndarray, *, topk: int) -> dict:
    """Compute per-query expected AP, AP@k, precision@k and recall@k under random tie order.

    Args:
      counts: int [num_queries, code_length + 1], database items per Hamming distance.
      relevant: int [num_queries, code_length + 1], relevant database items per Hamming distance.
      topk: cutoff k >= 1.

    Returns:
      dict of float64 [num_queries] arrays: `average_precision`, `average_precision_at_k`,
      `precision_at_k`, `recall_at_k`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    relevant = np.asarray(relevant, dtype=np.int64)
    num_db = int(counts[0].sum())
    total_relevant = relevant.sum(axis=1).astype(np.float64)
    has_relevant = total_relevant > 0
    harmonic = harmonic_numbers(num_db)

    ap_sums = _expected_group_precision_sums(counts, relevant, num_db, harmonic).sum(axis=1)
    ap_k_sums = _expected_group_precision_sums(counts, relevant, topk, harmonic).sum(axis=1)
    relevant_in_top = _expected_relevant_in_top(counts, relevant, topk)

    k_normaliser = np.minimum(topk, np.maximum(total_relevant, 1.0))
    return {
        "average_precision": np.where(has_relevant, ap_sums / np.maximum(total_relevant, 1.0), 0.0),
        "average_precision_at_k": np.where(has_relevant, ap_k_sums / k_normaliser, 0.0),
        "precision_at_k": relevant_in_top / min(topk, num_db),
        "recall_at_k": np.where(has_relevant, relevant_in_top / np.maximum(total_relevant, 1.0), 0.0),
    }


def _pairwise_row_sum(values: jax.Array) -> jax.Array:
    """Sum float32 [rows, n] over axis 1 with a fixed pairwise tree of elementwise adds.

    Unlike a reduction, whose order XLA picks per shape, the result of each row does not depend on
    the number of rows, so chunked, unchunked and sharded runs give identical sums; the rounding
    error grows with log2(n) instead of n.
    """
    width = 1 << max(0, (values.shape[1] - 1).bit_length())
    values = jnp.pad(values, ((0, 0), (0, width - values.shape[1])))
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        values = values[:, :half] + values[:, half:]
    return values[:, 0]


def _ranked_kernel(query_words, query_labels, db_operand, db_labels, *, code_length, method, topk):
    distance = _distance_block(query_words, db_operand, code_length, method)
    relevant = _relevance_block(query_labels, db_labels)
    counts, relevant_counts = _histogram_block(distance, relevant, code_length)

    order = jnp.argsort(distance, axis=1, stable=True)
    relevant_sorted = jnp.take_along_axis(relevant, order, axis=1)
    hits = jnp.cumsum(relevant_sorted, axis=1, dtype=jnp.int32)
    rank = jnp.arange(1, distance.shape[1] + 1, dtype=jnp.float32)
    precision_at_hits = jnp.where(relevant_sorted, hits.astype(jnp.float32) / rank, 0.0)

    ap_sum = _pairwise_row_sum(precision_at_hits)
    ap_k_sum = _pairwise_row_sum(precision_at_hits[:, :topk])
    relevant_in_top = hits[:, topk - 1]
    return counts, relevant_counts, ap_sum, ap_k_sum, relevant_in_top


def ranked_metrics(
    query_packed, db_packed, code_length: int, query_labels, db_labels, *, topk: int, method: str = "auto",
    chunk_size: int | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Compute per-query AP, AP@k, precision@k, recall@k with ties in database order (stable sort).

    Returns:
      (per_query, counts, relevant): per_query holds float64 [num_queries] arrays with the keys of
      `tie_aware_metrics`; counts and relevant are the int64 [num_queries, code_length + 1] histograms.
    """
    query, db = _check_pair(query_packed, db_packed, code_length)
    query_encoded, db_encoded = encode_labels(query_labels, db_labels)
    _check_label_rows(query, db, query_encoded, db_encoded)
    method = resolve_method(method)
    num_db = db.shape[0]
    cutoff = min(topk, num_db)

    db_operand = _db_operand(jnp.asarray(db), code_length, method)
    counts, relevant, ap_sums, ap_k_sums, relevant_in_top = run_chunked(
        _ranked_kernel, [query, query_encoded], [db_operand, db_encoded], num_db=num_db, chunk_size=chunk_size,
        static={"code_length": code_length, "method": method, "topk": cutoff},
        block_elements=RANKED_BLOCK_ELEMENTS,
    )

    total_relevant = relevant.sum(axis=1).astype(np.float64)
    has_relevant = total_relevant > 0
    safe_total = np.maximum(total_relevant, 1.0)
    per_query = {
        "average_precision": np.where(has_relevant, ap_sums / safe_total, 0.0),
        "average_precision_at_k": np.where(has_relevant, ap_k_sums / np.minimum(topk, safe_total), 0.0),
        "precision_at_k": relevant_in_top / cutoff,
        "recall_at_k": np.where(has_relevant, relevant_in_top / safe_total, 0.0),
    }
    return per_query, counts.astype(np.int64), relevant.astype(np.int64)


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ValueError(f"{name} must be at least {minimum}{upper}, got {value}.")
    return int(value)


def retrieval_metrics(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    *,
    topk: int = 100,
    radius: int = 2,
    ranking: str = "tie-aware",
    method: str = "auto",
    chunk_size: int | None = None,
    code_length: int | None = None,
) -> dict:
    """Evaluate Hamming ranking of a query set against a database.

    Args:
      query_codes: [num_queries, bits] int/bool codes in {-1, +1} or {0, 1}, or packed uint32
        [num_queries, ceil(bits / 32)] together with `code_length`.
      db_codes: the database codes, in the same form.
      query_labels, db_labels: int [n] single labels, or multi-hot bool / {0, 1} [n, num_labels].
      topk: k for mAP@k, precision@k and recall@k.
      radius: Hamming radius for `precision_within_radius`, in [0, code_length].
      ranking: "tie-aware" (expected values under random tie order) or "ranked" (stable sort, ties in
        database order, the common published definition). See the module docstring.
      method: Hamming kernel, "auto", "popcount" or "matmul"; results are identical.
      chunk_size: queries per device step, or None to size chunks automatically.
      code_length: bits per code; required for packed input.

    Returns:
      dict with `map`, `map_at_k`, `precision_at_k`, `recall_at_k`, `precision_within_radius` (floats),
      `pr_curve` (dict of lists over radius 0..code_length), `num_queries`, `num_db`,
      `num_queries_without_relevant`, `num_queries_empty_radius`, `topk`, `radius`, `ranking`,
      `code_length`.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}.")
    query_packed, query_length = prepare_codes(query_codes, code_length, "query")
    db_packed, db_length = prepare_codes(db_codes, code_length, "database")
    if query_length != db_length:
        raise ValueError(
            f"query codes have code length {query_length} but database codes have {db_length}; encode both "
            "with the same model."
        )
    topk = _check_int("topk", topk, 1)
    radius = _check_int("radius", radius, 0, query_length)

    if ranking == "tie-aware":
        counts, relevant = distance_histograms(
            query_packed, db_packed, query_length, query_labels, db_labels, method=method, chunk_size=chunk_size
        )
        per_query = tie_aware_metrics(counts, relevant, topk=topk)
    else:
        per_query, counts, relevant = ranked_metrics(
            query_packed, db_packed, query_length, query_labels, db_labels, topk=topk, method=method,
            chunk_size=chunk_size,
        )

    results = {
        "map": float(per_query["average_precision"].mean()),
        "map_at_k": float(per_query["average_precision_at_k"].mean()),
        "precision_at_k": float(per_query["precision_at_k"].mean()),
        "recall_at_k": float(per_query["recall_at_k"].mean()),
    }
    results.update(radius_metrics(counts, relevant, radius))
    results.update({
        "num_queries": int(counts.shape[0]),
        "num_db": int(db_packed.shape[0]),
        "num_queries_without_relevant": int((relevant.sum(axis=1) == 0).sum()),
        "topk": topk,
        "radius": radius,
        "ranking": ranking,
        "code_length": query_length,
    })
    return results
