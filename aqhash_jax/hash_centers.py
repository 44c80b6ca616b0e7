"""Class hash centres: one {-1,+1} target code per class, spread far apart in Hamming distance.

The "centers" symmetric objective pulls every image's code towards the centre of its class (as in
central similarity quantization, Yuan et al., CVPR 2020). Retrieval quality then depends on how far
apart the centres are: two classes whose centres differ in one bit are confused by a single flipped
bit. `make_hash_centers` picks the centres by farthest-point selection over a candidate pool. For
codes of up to 16 bits the pool is a lexicode: the greedy code that scans all codes in
lexicographic order and keeps each one at distance >= d from those already chosen, with the largest
d that still gives enough codewords. So 100 centres at 12 bits are at least 4 bits apart, where
random centres give 1 or 2. Longer codes draw the pool at random.
"""

from __future__ import annotations

import numpy as np

# Above this code length the candidate pool is sampled instead of enumerated.
_ENUMERATE_MAX_BITS = 16
_SAMPLED_POOL_SIZE = 8192


def _lexicode(code_length: int, min_distance: int) -> np.ndarray:
    """Return the lexicode of the given length and minimum distance, int8 [m, code_length]."""
    integers = np.arange(2**code_length, dtype=np.int64)
    all_codes = ((integers[:, None] >> np.arange(code_length)) & 1).astype(np.int16)
    kept = all_codes[:1]
    for code in all_codes[1:]:
        if np.abs(kept - code).sum(axis=1).min() >= min_distance:
            kept = np.vstack([kept, code])
    return (2 * kept - 1).astype(np.int8)


def _candidate_pool(num_classes: int, code_length: int, rng: np.random.Generator) -> np.ndarray:
    """Return candidate codes, int8 [m, code_length] in {-1,+1}, m >= num_classes."""
    if code_length <= _ENUMERATE_MAX_BITS:
        for min_distance in range(code_length // 2, 0, -1):
            pool = _lexicode(code_length, min_distance)
            if len(pool) >= num_classes:
                return pool[rng.permutation(len(pool))]
    return np.where(rng.random((_SAMPLED_POOL_SIZE, code_length)) < 0.5, -1, 1).astype(np.int8)


def make_hash_centers(num_classes: int, code_length: int, *, seed: int = 0) -> np.ndarray:
    """Choose `num_classes` centres of `code_length` bits with a large minimum Hamming distance.

    Farthest-point selection over the candidate pool: start from a random candidate, then
    repeatedly add the candidate whose distance to its nearest chosen centre is largest (ties go to the earlier candidate in a
    seeded shuffle). Deterministic for a seed.

    Returns int8 [num_classes, code_length] in {-1,+1}.
    Raises ValueError when there are fewer distinct codes than classes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is invalid; it must be at least 1.")
    if code_length < 1:
        raise ValueError(f"code_length={code_length} is invalid; it must be at least 1.")
    if code_length < 63 and num_classes > 2**code_length:
        raise ValueError(
            f"{num_classes} classes need distinct centres but {code_length} bits give only "
            f"{2**code_length} codes; use a longer code length."
        )

    rng = np.random.default_rng(seed)
    pool = _candidate_pool(num_classes, code_length, rng)
    pool_float = pool.astype(np.float32)

    chosen = [0]
    # Hamming distance from every candidate to its nearest chosen centre.
    nearest = (code_length - pool_float @ pool_float[0]) / 2
    for _ in range(1, num_classes):
        next_index = int(np.argmax(nearest))
        chosen.append(next_index)
        distance = (code_length - pool_float @ pool_float[next_index]) / 2
        nearest = np.minimum(nearest, distance)
    return pool[np.asarray(chosen)]


def min_center_distance(centers: np.ndarray) -> int:
    """Return the smallest Hamming distance between two different centres, int8 [C, bits] input."""
    centers = np.asarray(centers)
    if centers.ndim != 2 or centers.dtype != np.int8:
        raise ValueError(f"centers must be int8 [C, bits], got {centers.dtype} {centers.shape}.")
    if len(centers) < 2:
        return int(centers.shape[1])
    as_float = centers.astype(np.float32)
    distances = (centers.shape[1] - as_float @ as_float.T) / 2
    np.fill_diagonal(distances, np.inf)
    return int(distances.min())
