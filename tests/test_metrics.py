"""Retrieval metrics against brute-force NumPy references."""

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from aqhash_jax.retrieval import pack_codes, retrieval_metrics
from aqhash_jax.retrieval.metrics import harmonic_numbers, tie_aware_metrics

METRIC_KEYS = ("map", "map_at_k", "precision_at_k", "recall_at_k")


def _relevance(query_labels, db_labels):
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]
    return (query_labels.astype(np.int64) @ db_labels.astype(np.int64).T) > 0


def _hamming(query_codes, db_codes):
    return (np.asarray(query_codes)[:, None, :] != np.asarray(db_codes)[None, :, :]).sum(axis=2)


def _metrics_for_order(relevant_sorted, topk):
    """AP, AP@k (normalised by min(k, R)), P@k (by min(k, n)), R@k of one ranked relevance list."""
    relevant_sorted = np.asarray(relevant_sorted, dtype=np.float64)
    total = relevant_sorted.sum()
    hits = np.cumsum(relevant_sorted)
    precision = hits / np.arange(1, len(hits) + 1)
    cutoff = min(topk, len(hits))
    if total == 0:
        return np.array([0.0, 0.0, hits[cutoff - 1] / cutoff, 0.0])
    ap = (precision * relevant_sorted).sum() / total
    ap_k = (precision * relevant_sorted)[:cutoff].sum() / min(topk, total)
    return np.array([ap, ap_k, hits[cutoff - 1] / cutoff, hits[cutoff - 1] / total])


def _enumerated_tie_aware(distance, relevant, topk):
    """Average the metrics over every permutation of the database (exact expectation over tie orders)."""
    num_db = distance.shape[1]
    per_query = []
    for row_distance, row_relevant in zip(distance, relevant):
        total = np.zeros(4)
        permutations = list(itertools.permutations(range(num_db)))
        for permutation in permutations:
            permutation = np.asarray(permutation)
            order = permutation[np.argsort(row_distance[permutation], kind="stable")]
            total += _metrics_for_order(row_relevant[order], topk)
        per_query.append(total / len(permutations))
    return np.mean(per_query, axis=0)


def _naive_ranked(distance, relevant, topk):
    """Full-matrix stable argsort, ties in database order, whole database kept."""
    order = np.argsort(distance, axis=1, kind="stable")
    rows = [_metrics_for_order(row_relevant[row_order], topk) for row_relevant, row_order in zip(relevant, order)]
    return np.mean(rows, axis=0)


def _as_vector(result):
    return np.array([result[key] for key in METRIC_KEYS])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("topk", [1, 3, 10])
def test_tie_aware_matches_permutation_enumeration(seed, topk):
    rng = np.random.default_rng(seed)
    query_codes = rng.choice([-1, 1], size=(4, 3))
    db_codes = rng.choice([-1, 1], size=(7, 3))
    query_labels = rng.integers(0, 2, size=4)
    db_labels = rng.integers(0, 2, size=7)

    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=topk, radius=1)
    expected = _enumerated_tie_aware(_hamming(query_codes, db_codes), _relevance(query_labels, db_labels), topk)
    np.testing.assert_allclose(_as_vector(result), expected, rtol=0, atol=1e-12)


def test_tie_aware_matches_monte_carlo_12_bits():
    rng = np.random.default_rng(7)
    query_codes = rng.integers(0, 2, size=(6, 12))
    # Few distinct database codes make large tie groups.
    prototypes = rng.integers(0, 2, size=(5, 12))
    db_codes = prototypes[rng.integers(0, 5, size=300)]
    query_labels = rng.integers(0, 4, size=6)
    db_labels = rng.integers(0, 4, size=300)
    topk = 50

    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=topk)
    distance = _hamming(query_codes, db_codes)
    relevant = _relevance(query_labels, db_labels)
    samples = []
    for _ in range(3000):
        permutation = rng.permutation(300)
        samples.append(_naive_ranked(distance[:, permutation], relevant[:, permutation], topk))
    samples = np.asarray(samples)
    standard_error = samples.std(axis=0) / np.sqrt(len(samples))
    np.testing.assert_array_less(np.abs(_as_vector(result) - samples.mean(axis=0)), 5 * standard_error + 1e-9)


def test_harmonic_numbers():
    harmonic = harmonic_numbers(4)
    np.testing.assert_allclose(harmonic, [0.0, 1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])


def test_identical_codes_give_base_rate():
    # All database items tie at distance 0, so every tie-aware metric equals its random-order value.
    query_codes = np.ones((2, 12), dtype=np.int8)
    db_codes = np.ones((10, 12), dtype=np.int8)
    query_labels = np.array([0, 1])
    db_labels = np.array([0] * 4 + [1] * 6)

    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=5)
    # Expected precision@5 is the relevant fraction (0.4 and 0.6), recall@5 is 5 / 10, and the
    # expected AP of a random order of n items with r relevant is (r - 1) / (n - 1) + (n - r) / (n (n - 1)) * H(n).
    assert result["precision_at_k"] == pytest.approx((0.4 + 0.6) / 2)
    assert result["recall_at_k"] == pytest.approx(0.5)
    assert result["precision_within_radius"] == pytest.approx(0.5)
    assert result["num_queries_empty_radius"] == 0
    harmonic_10 = harmonic_numbers(10)[10]
    expected_ap = [(r - 1) / 9 + (10 - r) / 90 * harmonic_10 for r in (4, 6)]
    assert result["map"] == pytest.approx(np.mean(expected_ap))


def test_no_relevant_queries_count_as_zero():
    rng = np.random.default_rng(3)
    query_codes = rng.integers(0, 2, size=(3, 12))
    db_codes = rng.integers(0, 2, size=(20, 12))
    query_labels = np.array([0, 5, 6])
    db_labels = np.zeros(20, dtype=np.int64)

    for ranking in ("tie-aware", "ranked"):
        result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking=ranking)
        assert result["num_queries_without_relevant"] == 2
        assert result["map"] == pytest.approx(1.0 / 3)
        assert result["recall_at_k"] == pytest.approx(1.0 / 3)


def test_topk_larger_than_database():
    rng = np.random.default_rng(4)
    query_codes = rng.integers(0, 2, size=(5, 12))
    db_codes = rng.integers(0, 2, size=(9, 12))
    query_labels = rng.integers(0, 3, size=5)
    db_labels = rng.integers(0, 3, size=9)
    distance = _hamming(query_codes, db_codes)
    relevant = _relevance(query_labels, db_labels)

    ranked = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=50, ranking="ranked")
    np.testing.assert_allclose(_as_vector(ranked), _naive_ranked(distance, relevant, 50), atol=1e-6)
    tie_aware = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=50)
    assert tie_aware["map_at_k"] == pytest.approx(tie_aware["map"])
    assert tie_aware["recall_at_k"] == pytest.approx(1.0 - tie_aware["num_queries_without_relevant"] / 5)
    assert tie_aware["topk"] == 50


def test_multi_label_relevance():
    rng = np.random.default_rng(5)
    query_codes = rng.integers(0, 2, size=(5, 4))
    db_codes = rng.integers(0, 2, size=(7, 4))
    query_labels = rng.integers(0, 2, size=(5, 40)).astype(bool)
    db_labels = (rng.random((7, 40)) < 0.03).astype(np.int32)

    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=4, radius=1)
    expected = _enumerated_tie_aware(_hamming(query_codes, db_codes), _relevance(query_labels, db_labels), 4)
    np.testing.assert_allclose(_as_vector(result), expected, atol=1e-12)

    ranked = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, topk=4, ranking="ranked")
    naive = _naive_ranked(_hamming(query_codes, db_codes), _relevance(query_labels, db_labels), 4)
    np.testing.assert_allclose(_as_vector(ranked), naive, atol=1e-6)


@pytest.mark.parametrize("code_length", [12, 48])
def test_ranked_matches_naive_argsort(code_length):
    rng = np.random.default_rng(code_length)
    query_codes = rng.choice([-1, 1], size=(60, code_length))
    db_codes = rng.choice([-1, 1], size=(500, code_length))
    query_labels = rng.integers(0, 10, size=60)
    db_labels = rng.integers(0, 10, size=500)

    result = retrieval_metrics(
        query_codes, db_codes, query_labels, db_labels, topk=37, ranking="ranked", chunk_size=16
    )
    naive = _naive_ranked(_hamming(query_codes, db_codes), _relevance(query_labels, db_labels), 37)
    np.testing.assert_allclose(_as_vector(result), naive, rtol=0, atol=1e-6)
    assert result["ranking"] == "ranked"


def test_ranked_depends_on_database_order_tie_aware_does_not():
    rng = np.random.default_rng(11)
    query_codes = rng.integers(0, 2, size=(20, 12))
    db_codes = rng.integers(0, 2, size=(400, 12))
    query_labels = rng.integers(0, 5, size=20)
    db_labels = rng.integers(0, 5, size=400)
    permutation = rng.permutation(400)

    tie_aware = retrieval_metrics(query_codes, db_codes, query_labels, db_labels)
    tie_aware_shuffled = retrieval_metrics(query_codes, db_codes[permutation], query_labels, db_labels[permutation])
    assert tie_aware["map"] == pytest.approx(tie_aware_shuffled["map"], abs=1e-12)

    # Sorting relevant items first within each distance gives the best tie order.
    relevant = _relevance(query_labels, db_labels)
    best_first = np.argsort(~relevant[0], kind="stable")
    ranked = retrieval_metrics(query_codes[:1], db_codes[best_first], query_labels[:1], db_labels[best_first], ranking="ranked")
    tie_aware_one = retrieval_metrics(query_codes[:1], db_codes, query_labels[:1], db_labels)
    assert ranked["map"] > tie_aware_one["map"]


def test_pr_curve_and_radius():
    rng = np.random.default_rng(6)
    query_codes = rng.integers(0, 2, size=(15, 12))
    db_codes = rng.integers(0, 2, size=(80, 12))
    query_labels = rng.integers(0, 3, size=15)
    db_labels = rng.integers(0, 3, size=80)
    distance = _hamming(query_codes, db_codes)
    relevant = _relevance(query_labels, db_labels)

    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, radius=3)
    for radius in range(13):
        inside = distance <= radius
        retrieved = inside.sum(axis=1)
        hits = (inside & relevant).sum(axis=1)
        precision = np.where(retrieved > 0, hits / np.maximum(retrieved, 1), 0.0)
        recall = np.where(relevant.sum(axis=1) > 0, hits / np.maximum(relevant.sum(axis=1), 1), 0.0)
        assert result["pr_curve"]["precision"][radius] == pytest.approx(precision.mean())
        assert result["pr_curve"]["recall"][radius] == pytest.approx(recall.mean())
        if radius == 3:
            assert result["precision_within_radius"] == pytest.approx(precision.mean())
            assert result["num_queries_empty_radius"] == int((retrieved == 0).sum())
    assert result["pr_curve"]["radius"] == list(range(13))


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(8)
    query_codes = rng.integers(0, 2, size=(45, 24))
    db_codes = rng.integers(0, 2, size=(300, 24))
    query_labels = rng.integers(0, 6, size=45)
    db_labels = rng.integers(0, 6, size=300)

    for ranking in ("tie-aware", "ranked"):
        whole = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking=ranking, chunk_size=45)
        chunked = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking=ranking, chunk_size=7)
        assert whole == chunked


def test_popcount_and_matmul_metrics_equal():
    rng = np.random.default_rng(9)
    query_codes = rng.integers(0, 2, size=(30, 48))
    db_codes = rng.integers(0, 2, size=(200, 48))
    query_labels = rng.integers(0, 6, size=30)
    db_labels = rng.integers(0, 6, size=200)

    popcount = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, method="popcount")
    matmul = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, method="matmul")
    assert popcount == matmul


def test_packed_input_needs_code_length():
    rng = np.random.default_rng(10)
    query_codes = rng.integers(0, 2, size=(10, 20))
    db_codes = rng.integers(0, 2, size=(30, 20))
    labels_q = rng.integers(0, 3, size=10)
    labels_db = rng.integers(0, 3, size=30)

    raw = retrieval_metrics(query_codes, db_codes, labels_q, labels_db)
    packed = retrieval_metrics(pack_codes(query_codes), pack_codes(db_codes), labels_q, labels_db, code_length=20)
    assert raw == packed
    with pytest.raises(ValueError, match="code_length"):
        retrieval_metrics(pack_codes(query_codes), pack_codes(db_codes), labels_q, labels_db)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ranking": "sorted"}, "ranking must be one of"),
        ({"topk": 0}, "topk must be at least 1"),
        ({"radius": 13}, "radius must be at least 0 and at most 12"),
        ({"method": "gemm"}, "method must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    codes = np.ones((3, 12), dtype=np.int8)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(codes, codes, np.zeros(3, int), np.zeros(3, int), **kwargs)


def test_mismatched_inputs_raise():
    rng = np.random.default_rng(12)
    query_codes = rng.integers(0, 2, size=(4, 12))
    db_codes = rng.integers(0, 2, size=(6, 16))
    with pytest.raises(ValueError, match="code length 12 but database codes have 16"):
        retrieval_metrics(query_codes, db_codes, np.zeros(4, int), np.zeros(6, int))
    with pytest.raises(ValueError, match="got 5 database labels for 6"):
        retrieval_metrics(query_codes, rng.integers(0, 2, (6, 12)), np.zeros(4, int), np.zeros(5, int))
    with pytest.raises(ValueError, match="labels must be int"):
        retrieval_metrics(query_codes, query_codes, np.zeros(4, int), np.zeros((4, 2, 2), int))


def test_tie_aware_from_histograms_direct():
    # One query, groups (n=2, r=1) at distance 0 and (n=1, r=1) at distance 1.
    # Orders: [rel, non, rel] -> AP = (1 + 2/3) / 2; [non, rel, rel] -> AP = (1/2 + 2/3) / 2.
    per_query = tie_aware_metrics(np.array([[2, 1]]), np.array([[1, 1]]), topk=3)
    expected = ((1 + 2 / 3) / 2 + (0.5 + 2 / 3) / 2) / 2
    assert per_query["average_precision"][0] == pytest.approx(expected)


def test_sharded_8_devices_equal_single_device(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import jax
        from aqhash_jax.retrieval import retrieval_metrics, hamming_topk, pack_codes
        rng = np.random.default_rng(0)
        query_codes = rng.integers(0, 2, size=(37, 32))
        db_codes = rng.integers(0, 2, size=(150, 32))
        query_labels = rng.integers(0, 5, size=37)
        db_labels = rng.integers(0, 5, size=150)
        out = {"devices": len(jax.devices())}
        for ranking in ("tie-aware", "ranked"):
            out[ranking] = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, ranking=ranking, chunk_size=10)
        distances, indices = hamming_topk(pack_codes(query_codes), pack_codes(db_codes), 32, 9)
        out["topk"] = [distances.tolist(), indices.tolist()]
        json.dump(out, sys.stdout)
        """
    )
    outputs = []
    for device_count in (1, 8):
        environment = dict(os.environ)
        environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
        environment["JAX_PLATFORMS"] = "cpu"
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300, check=False
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        outputs.append(__import__("json").loads(completed.stdout))
    assert outputs[0]["devices"] == 1
    assert outputs[1]["devices"] == 8
    for key in ("tie-aware", "ranked", "topk"):
        assert outputs[0][key] == outputs[1][key], key
