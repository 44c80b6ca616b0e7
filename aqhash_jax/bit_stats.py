"""Per-bit statistics of binary codes: balance, entropy, correlation, unused and duplicated bits.

Unused bits (almost always the same sign) and duplicated bits (almost always equal to, or the
negation of, another bit) are the usual failure of hashing at low code lengths: each wastes one
of the few bits. `bit_statistics` finds them from the database codes alone, so it runs on any
exported code file without the model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import numpy as np

DEFAULT_UNUSED_THRESHOLD = 0.95
DEFAULT_DUPLICATE_THRESHOLD = 0.95


def _check_codes(codes: Any) -> np.ndarray:
    if not isinstance(codes, np.ndarray):
        raise ValueError(
            f"codes must be a numpy array, got {type(codes).__name__}; convert with np.asarray(codes, np.int8)."
        )
    if codes.dtype != np.int8:
        raise ValueError(
            f"codes must have dtype int8 with values in {{-1, +1}}, got dtype {codes.dtype}; convert "
            "{0, 1} codes with 2 * codes - 1 and cast to np.int8 (CodeFile.signs() returns int8)."
        )
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must have shape [n, K] with n >= 1 and K >= 1, got shape {codes.shape}.")
    invalid = (codes != 1) & (codes != -1)
    if invalid.any():
        row, bit = np.argwhere(invalid)[0]
        raise ValueError(
            f"codes must contain only -1 and +1, got {int(codes[row, bit])} at row {int(row)}, bit {int(bit)}."
        )
    return codes


def _check_threshold(name: str, value: float) -> float:
    if not 0.5 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0.5, 1], got {value}.")
    return float(value)


def binary_entropy(positive_fraction: np.ndarray) -> np.ndarray:
    """Return the entropy in bits of a bit that is +1 with probability p, float64 [...].

    H(p) = -p log2 p - (1 - p) log2 (1 - p), with H(0) = H(1) = 0.
    """
    p = np.asarray(positive_fraction, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -p * np.log2(p) - (1.0 - p) * np.log2(1.0 - p)
    return np.where((p <= 0.0) | (p >= 1.0), 0.0, terms)


def bit_correlation(codes: np.ndarray) -> np.ndarray:
    """Return the Pearson correlation between bits, float64 [K, K].

    Args:
      codes: int8 [n, K] in {-1, +1}.

    Returns:
      float64 [K, K]. A constant bit (one value over all n codes) has no defined correlation, so
      its row and column are NaN. The diagonal of every other bit is 1.
    """
    codes = _check_codes(codes).astype(np.float64)

    centred = codes - codes.mean(axis=0, keepdims=True)
    covariance = centred.T @ centred / codes.shape[0]
    deviation = np.sqrt(np.diag(covariance))
    # Sums of exact +/-1 values are exact in float64, so a constant bit has deviation exactly 0.
    constant = deviation == 0.0
    safe = np.where(constant, 1.0, deviation)
    correlation = covariance / np.outer(safe, safe)
    correlation = np.clip(correlation, -1.0, 1.0)
    correlation[constant, :] = np.nan
    correlation[:, constant] = np.nan
    return correlation


def bit_statistics(
    codes: np.ndarray,
    *,
    unused_threshold: float = DEFAULT_UNUSED_THRESHOLD,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
) -> dict[str, Any]:
    """Compute per-bit balance, entropy and correlation, and flag unused and duplicated bits.

    Args:
      codes: int8 [n, K] in {-1, +1}, one row per database item.
      unused_threshold: a bit is unused when the fraction of its majority sign is above this
        value (0.95 flags splits beyond 95/5).
      duplicate_threshold: two bits are duplicated when |Pearson correlation| is above this value;
        a correlation near -1 is a duplicate as well, because a negated bit adds no information.

    Returns:
      A JSON-serialisable dict:
        "num_codes": n; "code_length": K; the two thresholds;
        "bits": one dict per bit with "bit", "positive_fraction" (share of +1), "negative_fraction",
          "balance" (the majority share, 0.5 is ideal), "entropy_bits" (0 to 1),
          "max_abs_correlation" and "most_correlated_bit" (the partner with the largest
          |correlation|, and that correlation as "correlation_with_partner"), "unused",
          "duplicated" (bools). The correlation fields are None when the bit is constant or K = 1;
        "unused_bits": indices of unused bits;
        "duplicated_bits": indices of bits in at least one duplicated pair;
        "duplicate_pairs": [i, j, correlation] with i < j for every duplicated pair;
        "mean_entropy_bits": mean entropy over bits; "total_entropy_bits": its sum, an upper bound
          of the information the codes carry if the bits were independent.
    """
    codes = _check_codes(codes)
    unused_threshold = _check_threshold("unused_threshold", unused_threshold)
    duplicate_threshold = _check_threshold("duplicate_threshold", duplicate_threshold)
    num_codes, code_length = codes.shape

    positive_counts = np.count_nonzero(codes == 1, axis=0)
    positive_fraction = positive_counts / num_codes
    balance = np.maximum(positive_fraction, 1.0 - positive_fraction)
    entropy = binary_entropy(positive_fraction)
    unused = balance > unused_threshold

    correlation = bit_correlation(codes)
    off_diagonal = np.abs(correlation)
    np.fill_diagonal(off_diagonal, np.nan)

    duplicate_pairs = []
    for first in range(code_length):
        for second in range(first + 1, code_length):
            value = correlation[first, second]
            if not math.isnan(value) and abs(value) > duplicate_threshold:
                duplicate_pairs.append([first, second, float(value)])
    duplicated = np.zeros(code_length, dtype=bool)
    for first, second, _ in duplicate_pairs:
        duplicated[first] = duplicated[second] = True

    bits = []
    for bit in range(code_length):
        row = off_diagonal[bit]
        if np.all(np.isnan(row)):
            max_abs, partner, partner_correlation = None, None, None
        else:
            partner = int(np.nanargmax(row))
            max_abs = float(row[partner])
            partner_correlation = float(correlation[bit, partner])
        bits.append({
            "bit": bit,
            "positive_fraction": float(positive_fraction[bit]),
            "negative_fraction": float(1.0 - positive_fraction[bit]),
            "balance": float(balance[bit]),
            "entropy_bits": float(entropy[bit]),
            "max_abs_correlation": max_abs,
            "most_correlated_bit": partner,
            "correlation_with_partner": partner_correlation,
            "unused": bool(unused[bit]),
            "duplicated": bool(duplicated[bit]),
        })

    return {
        "num_codes": int(num_codes),
        "code_length": int(code_length),
        "unused_threshold": unused_threshold,
        "duplicate_threshold": duplicate_threshold,
        "bits": bits,
        "unused_bits": [int(bit) for bit in np.flatnonzero(unused)],
        "duplicated_bits": [int(bit) for bit in np.flatnonzero(duplicated)],
        "duplicate_pairs": duplicate_pairs,
        "mean_entropy_bits": float(entropy.mean()),
        "total_entropy_bits": float(entropy.sum()),
    }


def format_bit_statistics(stats: dict[str, Any], max_pairs: int = 12) -> str:
    """Return a fixed-width table of `bit_statistics` output, one line per bit, and a summary.

    The summary lists at most `max_pairs` duplicated pairs, because a collapsed code can have
    K * (K - 1) / 2 of them.
    """
    lines = [
        f"bit statistics over {stats['num_codes']} codes of {stats['code_length']} bits",
        f"{'bit':>4} {'+1':>7} {'-1':>7} {'entropy':>8} {'max|corr|':>9} {'partner':>7}  flags",
    ]
    for bit in stats["bits"]:
        flags = [name for name in ("unused", "duplicated") if bit[name]]
        max_abs = "-" if bit["max_abs_correlation"] is None else f"{bit['max_abs_correlation']:.3f}"
        partner = "-" if bit["most_correlated_bit"] is None else str(bit["most_correlated_bit"])
        lines.append(
            f"{bit['bit']:>4} {bit['positive_fraction']:>7.3f} {bit['negative_fraction']:>7.3f} "
            f"{bit['entropy_bits']:>8.3f} {max_abs:>9} {partner:>7}  {' '.join(flags)}"
        )
    pairs = [pair[:2] for pair in stats["duplicate_pairs"]]
    shown_pairs = ", ".join(f"{first}-{second}" for first, second in pairs[:max_pairs])
    if len(pairs) > max_pairs:
        shown_pairs += f" and {len(pairs) - max_pairs} more (see the JSON file)"
    lines.append(f"mean entropy {stats['mean_entropy_bits']:.3f} bits")
    lines.append(f"unused bits (majority share > {stats['unused_threshold']:g}): {stats['unused_bits'] or 'none'}")
    lines.append(
        f"duplicated pairs (|corr| > {stats['duplicate_threshold']:g}): {len(pairs)}"
        + (f": {shown_pairs}" if pairs else "")
    )
    return "\n".join(lines)


def _default_file_mode() -> int:
    """Return 0o666 minus the process umask, the mode that open() gives a new file.

    NamedTemporaryFile creates its file with mode 0o600, which would make the output unreadable
    to other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bit_statistics(path: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Write `stats` as JSON to `path` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    text = json.dumps(stats, indent=1, allow_nan=False)
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(
        "w", dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp", delete=False, encoding="utf-8"
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, _default_file_mode())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise
