"""Packing, unpacking and sign binarisation of hash codes."""

import numpy as np
import pytest

from aqhash_jax.retrieval import num_words, pack_codes, sign_codes, unpack_codes
from aqhash_jax.retrieval.codes import validate_packed


@pytest.mark.parametrize("code_length", [1, 12, 31, 32, 33, 48, 64, 100])
def test_round_trip_signs(code_length):
    rng = np.random.default_rng(code_length)
    codes = rng.choice([-1, 1], size=(17, code_length)).astype(np.int32)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint32
    assert packed.shape == (17, num_words(code_length))
    unpacked = unpack_codes(packed, code_length)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, codes)


def test_zero_one_and_bool_inputs_pack_alike():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=(9, 40))
    expected = pack_codes(np.where(bits == 1, 1, -1))
    np.testing.assert_array_equal(pack_codes(bits), expected)
    np.testing.assert_array_equal(pack_codes(bits.astype(bool)), expected)
    np.testing.assert_array_equal(pack_codes(bits.astype(np.uint8)), expected)


def test_bit_layout_lsb_first():
    codes = -np.ones((1, 40), dtype=np.int8)
    codes[0, 0] = 1
    codes[0, 5] = 1
    codes[0, 33] = 1
    packed = pack_codes(codes)
    assert packed[0, 0] == (1 << 0) | (1 << 5)
    assert packed[0, 1] == 1 << 1


def test_padding_bits_are_zero():
    packed = pack_codes(np.ones((3, 12), dtype=np.int8))
    np.testing.assert_array_equal(packed[:, 0], np.uint32((1 << 12) - 1))


def test_all_ones_is_unambiguous():
    np.testing.assert_array_equal(pack_codes(np.ones((2, 5), np.int64)), pack_codes(np.full((2, 5), True)))


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.array([[0.5, -0.5]]), "sign_codes"),
        (np.array([[1, -1, 0]]), "only"),
        (np.array([[2, 1]]), "only"),
        (np.array([1, -1]), "shape"),
        (np.ones((2, 2, 2), dtype=np.int8), "shape"),
        (np.array([["a", "b"]]), "integer or boolean"),
        (np.zeros((3, 0), dtype=np.int8), "at least one bit"),
    ],
)
def test_pack_rejects_invalid_codes(codes, message):
    with pytest.raises(ValueError, match=message):
        pack_codes(codes)


def test_sign_codes_maps_zero_to_plus_one():
    codes = sign_codes(np.array([[0.0, -0.0, -1e-9, 3.0, -2.0]], dtype=np.float32))
    np.testing.assert_array_equal(codes, [[1, 1, -1, 1, -1]])
    assert codes.dtype == np.int8


def test_sign_codes_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        sign_codes(np.ones((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="NaN"):
        sign_codes(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        sign_codes(np.ones(3))


def test_validate_packed_rejects_mismatches():
    packed = pack_codes(np.ones((2, 40), dtype=np.int8))
    with pytest.raises(ValueError, match="uint32"):
        validate_packed(packed.astype(np.int64), 40)
    with pytest.raises(ValueError, match=r"shape \[n, 1\]"):
        validate_packed(packed, 32)
    with pytest.raises(ValueError, match="nonzero bits above code length 36"):
        validate_packed(packed, 36)
    with pytest.raises(ValueError, match="at least 1"):
        num_words(0)
