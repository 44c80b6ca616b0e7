"""Binary hash codes: sign binarisation and packing into uint32 words.

Packing layout (shared by every module and by codes on disk): bit j of a code goes to word
j // 32 at bit position j % 32, least significant bit first. A +1 (or 1, or True) is stored as 1,
a -1 (or 0, or False) as 0, and the padding bits above the code length in the last word are 0.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 32


def num_words(code_length: int) -> int:
    """Return the number of uint32 words that hold a code of `code_length` bits."""
    if isinstance(code_length, bool) or not isinstance(code_length, (int, np.integer)):
        raise ValueError(f"code_length must be an int, got {code_length!r} of type {type(code_length).__name__}.")
    if code_length < 1:
        raise ValueError(f"code_length must be at least 1, got {code_length}.")
    return (int(code_length) + WORD_BITS - 1) // WORD_BITS


def sign_codes(float_codes) -> np.ndarray:
    """Binarise real-valued model outputs: values >= 0 map to +1, values < 0 to -1.

    Args:
      float_codes: float array [n, bits], for example the `codes` output of the hash head.

    Returns:
      int8 array [n, bits] with values in {-1, +1}.
    """
    values = np.asarray(float_codes)
    if values.ndim != 2:
        raise ValueError(f"float_codes must have shape [n, bits], got shape {values.shape}.")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(
            f"float_codes must be a float array, got dtype {values.dtype}; integer or boolean codes are "
            "already binary, so pass them to pack_codes directly."
        )
    if np.isnan(values).any():
        raise ValueError("float_codes contains NaN, which has no sign; check the model outputs.")
    return np.where(values >= 0, 1, -1).astype(np.int8)


def to_bits(codes) -> np.ndarray:
    """Validate binary codes and return them as bool [n, bits] with True for +1 / 1.

    Accepts bool arrays and integer arrays whose values are all in {-1, +1} or all in {0, 1}.
    Raises ValueError for floats (apply `sign_codes` first), other values and wrong ndim.
    """
    values = np.asarray(codes)
    if values.ndim != 2:
        raise ValueError(f"codes must have shape [n, bits], got shape {values.shape}.")
    if values.shape[1] < 1:
        raise ValueError(f"codes must have at least one bit per row, got shape {values.shape}.")
    if values.dtype == np.bool_:
        return values
    if np.issubdtype(values.dtype, np.floating):
        raise ValueError(
            f"codes have float dtype {values.dtype}; binarise them first with "
            "aqhash_jax.retrieval.sign_codes(codes), which maps >= 0 to +1 and < 0 to -1."
        )
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"codes must be an integer or boolean array, got dtype {values.dtype}.")
    if values.size == 0:
        return values.astype(np.bool_)
    present = np.unique(values)
    if np.isin(present, (-1, 1)).all() or np.isin(present, (0, 1)).all():
        return values == 1
    raise ValueError(
        f"codes must contain only {{-1, +1}} or only {{0, 1}}, found values {present[:8].tolist()}; "
        "binarise real-valued outputs with sign_codes."
    )


def pack_codes(codes) -> np.ndarray:
    """Pack binary codes into uint32 words.

    Args:
      codes: int or bool array [n, bits] with values in {-1, +1} or {0, 1}.

    Returns:
      uint32 array [n, ceil(bits / 32)]: bit j of row i is bit j % 32 of word j // 32, with +1 as 1
      and zero padding bits.
    """
    bits = to_bits(codes)
    n, code_length = bits.shape
    words = num_words(code_length)

    padded = np.zeros((n, words * WORD_BITS), dtype=np.uint32)
    padded[:, :code_length] = bits
    weights = np.left_shift(np.uint32(1), np.arange(WORD_BITS, dtype=np.uint32))
    # Every bit has its own weight, so the sum is a bitwise OR and cannot carry.
    return (padded.reshape(n, words, WORD_BITS) * weights).sum(axis=2, dtype=np.uint32)


def unpack_bits(packed, code_length: int) -> np.ndarray:
    """Unpack uint32 words [n, words] into bool [n, code_length], True where the bit is 1."""
    words = validate_packed(packed, code_length)
    shifts = np.arange(WORD_BITS, dtype=np.uint32)
    bits = (words[:, :, None] >> shifts) & np.uint32(1)
    return bits.reshape(words.shape[0], -1)[:, :code_length].astype(np.bool_)


def unpack_codes(packed, code_length: int) -> np.ndarray:
    """Unpack uint32 words into int8 codes in {-1, +1}.

    Args:
      packed: uint32 array [n, ceil(code_length / 32)] as written by `pack_codes`.
      code_length: number of bits per code.

    Returns:
      int8 array [n, code_length] with +1 where the bit is 1 and -1 where it is 0.
    """
    return np.where(unpack_bits(packed, code_length), 1, -1).astype(np.int8)


def validate_packed(packed, code_length: int) -> np.ndarray:
    """Check that `packed` is uint32 [n, ceil(code_length / 32)] with zero padding bits; return it."""
    words = np.asarray(packed)
    expected_words = num_words(code_length)
    if words.dtype != np.uint32:
        raise ValueError(
            f"packed codes must have dtype uint32, got {words.dtype}; pack {{-1, +1}} or {{0, 1}} codes "
            "with pack_codes."
        )
    if words.ndim != 2 or words.shape[1] != expected_words:
        raise ValueError(
            f"packed codes for code length {code_length} must have shape [n, {expected_words}], got shape "
            f"{words.shape}; check the code length."
        )
    spare_bits = expected_words * WORD_BITS - int(code_length)
    if spare_bits and words.shape[0]:
        padding_mask = np.uint32(~np.uint32(0)) << np.uint32(WORD_BITS - spare_bits)
        if np.any(words[:, -1] & padding_mask):
            raise ValueError(
                f"packed codes have nonzero bits above code length {code_length}; the code length is "
                "probably larger than the one passed."
            )
    return words
