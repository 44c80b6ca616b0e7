"""Tests of per-bit statistics on constructed codes with known balance, entropy and correlation."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from aqhash_jax import bit_stats


def _constructed_codes() -> np.ndarray:
    """Return int8 [8, 5] codes with known properties.

    bit 0: balanced 4/4; bit 1: constant +1; bit 2: a copy of bit 0; bit 3: the negation of
    bit 0; bit 4: 6/2, uncorrelated with bit 0 by construction.
    """
    bit0 = np.array([1, 1, 1, 1, -1, -1, -1, -1])
    bit1 = np.ones(8)
    bit4 = np.array([1, 1, 1, -1, 1, 1, 1, -1])
    return np.stack([bit0, bit1, bit0, -bit0, bit4], axis=1).astype(np.int8)


def test_balance_and_entropy_exact():
    stats = bit_stats.bit_statistics(_constructed_codes())
    bits = stats["bits"]

    assert stats["num_codes"] == 8
    assert stats["code_length"] == 5
    assert bits[0]["positive_fraction"] == 0.5
    assert bits[0]["balance"] == 0.5
    assert bits[0]["entropy_bits"] == 1.0
    assert bits[1]["positive_fraction"] == 1.0
    assert bits[1]["entropy_bits"] == 0.0
    assert bits[4]["positive_fraction"] == 0.75
    assert bits[4]["negative_fraction"] == 0.25
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert bits[4]["entropy_bits"] == pytest.approx(expected, abs=1e-12)
    assert stats["total_entropy_bits"] == pytest.approx(3.0 + expected, abs=1e-12)
    assert stats["mean_entropy_bits"] == pytest.approx((3.0 + expected) / 5, abs=1e-12)


def test_constant_bit_flagged_unused():
    stats = bit_stats.bit_statistics(_constructed_codes())

    assert stats["unused_bits"] == [1]
    assert stats["bits"][1]["unused"] is True
    assert stats["bits"][1]["max_abs_correlation"] is None
    assert stats["bits"][1]["most_correlated_bit"] is None
    assert stats["bits"][4]["unused"] is False


def test_unused_threshold_is_strict():
    # 19 of 20 is exactly 95/5, which is not beyond the default threshold; 20 of 20 is.
    codes = np.ones((20, 2), dtype=np.int8)
    codes[0, 0] = -1
    stats = bit_stats.bit_statistics(codes)

    assert stats["bits"][0]["balance"] == pytest.approx(0.95)
    assert stats["unused_bits"] == [1]
    assert bit_stats.bit_statistics(codes, unused_threshold=0.9)["unused_bits"] == [0, 1]


def test_copied_and_negated_bits_flagged():
    stats = bit_stats.bit_statistics(_constructed_codes())

    assert stats["duplicate_pairs"] == [[0, 2, 1.0], [0, 3, -1.0], [2, 3, -1.0]]
    assert stats["duplicated_bits"] == [0, 2, 3]
    assert stats["bits"][4]["duplicated"] is False
    assert stats["bits"][2]["max_abs_correlation"] == pytest.approx(1.0)
    assert stats["bits"][2]["most_correlated_bit"] in (0, 3)


def test_partner_and_correlation_values():
    stats = bit_stats.bit_statistics(_constructed_codes())
    bit4 = stats["bits"][4]

    # bit 4 against bit 0: cov = E[xy] - E[x]E[y] = 0 - 0 * 0.5 = 0, so the partner is the bit with
    # the largest |corr| among the rest, and all of them are 0 as well.
    assert bit4["max_abs_correlation"] == pytest.approx(0.0, abs=1e-12)
    assert bit4["most_correlated_bit"] in (0, 2, 3)


def test_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((200, 6)) < 0.4, 1, -1).astype(np.int8)
    codes[:, 5] = np.where(rng.random(200) < 0.9, codes[:, 0], -codes[:, 0])

    correlation = bit_stats.bit_correlation(codes)
    np.testing.assert_allclose(correlation, np.corrcoef(codes.T.astype(np.float64)), atol=1e-12)

    stats = bit_stats.bit_statistics(codes)
    assert stats["bits"][5]["most_correlated_bit"] == 0
    assert stats["bits"][0]["most_correlated_bit"] == 5
    assert stats["bits"][5]["max_abs_correlation"] == pytest.approx(abs(correlation[0, 5]))
    assert stats["bits"][5]["max_abs_correlation"] < 0.95
    assert stats["duplicate_pairs"] == []


def test_single_bit_has_no_partner():
    codes = np.array([[1], [-1], [1]], dtype=np.int8)
    stats = bit_stats.bit_statistics(codes)

    assert stats["bits"][0]["most_correlated_bit"] is None
    assert stats["bits"][0]["entropy_bits"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.array([[1, -1]], dtype=np.int32), "dtype int8"),
        (np.array([[1, 0]], dtype=np.int8), "only -1 and \\+1"),
        (np.array([1, -1], dtype=np.int8), "shape \\[n, K\\]"),
        (np.zeros((0, 4), dtype=np.int8), "n >= 1"),
        ([[1, -1]], "numpy array"),
    ],
)
def test_invalid_codes_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        bit_stats.bit_statistics(codes)


def test_invalid_threshold_raises():
    codes = np.ones((2, 2), dtype=np.int8)
    with pytest.raises(ValueError, match="unused_threshold"):
        bit_stats.bit_statistics(codes, unused_threshold=1.5)
    with pytest.raises(ValueError, match="duplicate_threshold"):
        bit_stats.bit_statistics(codes, duplicate_threshold=0.2)


def test_write_is_strict_json(tmp_path):
    stats = bit_stats.bit_statistics(_constructed_codes())
    path = tmp_path / "bit_stats.json"
    bit_stats.write_bit_statistics(path, stats)

    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bit_stats.json"]


def test_table_lists_flags():
    table = bit_stats.format_bit_statistics(bit_stats.bit_statistics(_constructed_codes()))
    lines = table.splitlines()

    assert len(lines) == 2 + 5 + 3
    assert lines[3].split()[-1] == "unused"
    assert lines[4].split()[-1] == "duplicated"
    assert lines[-2] == "unused bits (majority share > 0.95): [1]"
    assert lines[-1] == "duplicated pairs (|corr| > 0.95): 3: 0-2, 0-3, 2-3"


def test_table_shortens_pair_list():
    codes = np.repeat(np.array([[1], [-1], [1], [-1]], dtype=np.int8), 6, axis=1)
    table = bit_stats.format_bit_statistics(bit_stats.bit_statistics(codes), max_pairs=4)

    assert table.splitlines()[-1] == (
        "duplicated pairs (|corr| > 0.95): 15: 0-1, 0-2, 0-3, 0-4 and 11 more (see the JSON file)"
    )


def test_written_file_mode_follows_umask(tmp_path):
    path = tmp_path / "bit_stats.json"
    previous = os.umask(0o022)
    try:
        bit_stats.write_bit_statistics(path, bit_stats.bit_statistics(_constructed_codes()))
    finally:
        os.umask(previous)

    assert stat.S_IMODE(path.stat().st_mode) == 0o644
