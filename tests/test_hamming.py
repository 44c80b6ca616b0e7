"""Hamming kernels: popcount and matmul paths, top-k, histograms and chunking."""

import numpy as np
import pytest

from aqhash_jax.retrieval import distance_histograms, hamming_distance, hamming_topk, pack_codes, resolve_method
from aqhash_jax.retrieval.hamming import default_chunk_size, encode_labels


def _reference_distance(query_bits, db_bits):
    return (query_bits[:, None, :] != db_bits[None, :, :]).sum(axis=2)


@pytest.mark.parametrize("code_length", [12, 32, 48, 64, 77])
def test_popcount_and_matmul_equal_reference(code_length):
    rng = np.random.default_rng(code_length)
    query_bits = rng.integers(0, 2, size=(23, code_length))
    db_bits = rng.integers(0, 2, size=(150, code_length))
    expected = _reference_distance(query_bits, db_bits)
    for method in ("popcount", "matmul", "auto"):
        distance = hamming_distance(pack_codes(query_bits), pack_codes(db_bits), code_length, method=method, chunk_size=8)
        assert distance.dtype == np.int32
        np.testing.assert_array_equal(distance, expected)


def test_auto_is_popcount_on_cpu():
    assert resolve_method("auto") == "popcount"
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_method("xor")


@pytest.mark.parametrize("k", [1, 5, 40, 500])
def test_topk_ties_broken_by_index(k):
    rng = np.random.default_rng(k)
    query_bits = rng.integers(0, 2, size=(19, 12))
    db_bits = rng.integers(0, 2, size=(300, 12))
    expected_distance = _reference_distance(query_bits, db_bits)
    order = np.argsort(expected_distance, axis=1, kind="stable")[:, :k]

    for method in ("popcount", "matmul"):
        distances, indices = hamming_topk(pack_codes(query_bits), pack_codes(db_bits), 12, k, method=method, chunk_size=6)
        assert distances.shape == (19, min(k, 300))
        assert indices.dtype == np.int32
        np.testing.assert_array_equal(indices, order)
        np.testing.assert_array_equal(distances, np.take_along_axis(expected_distance, order, axis=1))


def test_topk_rejects_bad_k():
    packed = pack_codes(np.ones((2, 8), np.int8))
    with pytest.raises(ValueError, match="k must be a positive int"):
        hamming_topk(packed, packed, 8, 0)


def test_histograms_single_and_multi_label():
    rng = np.random.default_rng(1)
    query_bits = rng.integers(0, 2, size=(13, 20))
    db_bits = rng.integers(0, 2, size=(90, 20))
    distance = _reference_distance(query_bits, db_bits)

    single_query = rng.integers(0, 4, size=13)
    single_db = rng.integers(0, 4, size=90)
    multi_query = rng.random((13, 35)) < 0.1
    multi_db = (rng.random((90, 35)) < 0.1).astype(np.int64)
    cases = [
        (single_query, single_db, single_query[:, None] == single_db[None, :]),
        (multi_query, multi_db, (multi_query.astype(int) @ multi_db.T) > 0),
    ]
    for query_labels, db_labels, relevant in cases:
        for chunk_size in (None, 4):
            counts, relevant_counts = distance_histograms(
                pack_codes(query_bits), pack_codes(db_bits), 20, query_labels, db_labels, chunk_size=chunk_size
            )
            for row in range(13):
                np.testing.assert_array_equal(counts[row], np.bincount(distance[row], minlength=21))
                np.testing.assert_array_equal(
                    relevant_counts[row], np.bincount(distance[row][relevant[row]], minlength=21)
                )


def test_encode_labels_rejects_bad_labels():
    with pytest.raises(ValueError, match="must be integers"):
        encode_labels(np.array([0.5]), np.array([1.0]))
    with pytest.raises(ValueError, match="same number of labels"):
        encode_labels(np.zeros((2, 3), bool), np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        encode_labels(np.full((2, 3), 2), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="labels must be int"):
        encode_labels(np.zeros(2, int), np.zeros((2, 3), int))


def test_default_chunk_size_bounds_block():
    chunk = default_chunk_size(100_000, 1_000_000, 8, block_elements=2**23)
    assert chunk % 8 == 0
    assert chunk // 8 * 1_000_000 <= 2**23
    assert default_chunk_size(5, 10, 4) == 8


def test_rejects_bad_chunk_size_and_empty_sets():
    packed = pack_codes(np.ones((2, 8), np.int8))
    with pytest.raises(ValueError, match="chunk_size"):
        hamming_distance(packed, packed, 8, chunk_size=0)
    with pytest.raises(ValueError, match="non-empty"):
        hamming_distance(packed[:0], packed, 8)
