"""Training objectives for attribute-aware hash codes.

Two hashing objectives are provided, selected by the config value ``loss.objective``:

- ``"adsh"``: asymmetric deep supervised hashing (Jiang and Li, AAAI 2018), the objective of the
  reference PyTorch release of Wang et al. (ICML 2025). The database codes B (one row per
  training image) are free variables. The network is trained against B with ``adsh_loss``, and
  after every outer iteration B is updated in closed form by ``adsh_dcc_update``. Config values:
  ``loss.gamma`` (weight of the quantisation term, 200 in the release).
- ``"symmetric"``: the network encodes both sides of every pair (``symmetric_loss``), as a
  retrieval system that encodes new gallery images must. Config values:
  ``loss.similarity_weight``, ``loss.quantization_weight`` and ``loss.symmetric_form``
  ("pairwise_mse" or "dpsh").

Either objective can be combined with ``classification_loss`` on the head's "logits", weighted
by ``loss.classification_weight`` (0 in the release). During training the auxiliary bits are
concatenated to the main bits before the hashing loss (``loss_codes``), so the code length c
seen by a loss is K + A.

Labels are either integer class ids int [n] (two items are similar when the ids are equal) or
multi-hot [n, L] (similar when they share at least one label).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ADSH_LOSS_SCALE = 12.0
SYMMETRIC_FORMS = ("pairwise_mse", "pairwise_balanced", "dpsh", "centers")


# ---------------------------------------------------------------------------------------------
# Input checks (run at trace time, on shapes and dtypes only)
# ---------------------------------------------------------------------------------------------


def _check_float_matrix(name: str, value) -> None:
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape [items, bits], got {value.shape}.")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a float array, got dtype {value.dtype}. Pass the network's "
            "continuous codes as float32."
        )


def _check_code_matrix(name: str, value) -> None:
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape [items, bits], got {value.shape}.")
    if value.dtype not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)):
        raise ValueError(
            f"{name} must be int8 or float32 with entries in {{-1, +1}}, got dtype {value.dtype}. "
            "Convert it with .astype(jnp.int8)."
        )


def _check_labels(name: str, labels, items: int) -> None:
    if labels.ndim == 1:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"{name} with shape {labels.shape} must hold integer class ids, got dtype "
                f"{labels.dtype}. Pass multi-hot labels as [items, num_labels]."
            )
    elif labels.ndim != 2:
        raise ValueError(
            f"{name} must be int [items] class ids or multi-hot [items, num_labels], got shape "
            f"{labels.shape}."
        )
    if labels.shape[0] != items:
        raise ValueError(f"{name} has {labels.shape[0]} rows, expected {items}.")


def _check_indices(name: str, indices, items: int) -> None:
    if indices.ndim != 1 or indices.shape[0] != items:
        raise ValueError(f"{name} must have shape [{items}], got {indices.shape}.")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {indices.dtype}.")


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


def similarity_matrix(labels_a, labels_b) -> jax.Array:
    """Return the pairwise similarity S float32 [m, n] with entries in {0, 1}.

    Args:
      labels_a: int [m] class ids or multi-hot [m, L].
      labels_b: int [n] class ids or multi-hot [n, L], same kind as ``labels_a``.

    S_ij = 1 when the class ids are equal (int labels) or when the label sets intersect
    (multi-hot labels), else 0.
    """
    labels_a = jnp.asarray(labels_a)
    labels_b = jnp.asarray(labels_b)
    _check_labels("labels_a", labels_a, labels_a.shape[0])
    _check_labels("labels_b", labels_b, labels_b.shape[0])
    if labels_a.ndim != labels_b.ndim:
        raise ValueError(
            f"labels_a {labels_a.shape} and labels_b {labels_b.shape} must both be class ids "
            "[items] or both multi-hot [items, num_labels]."
        )

    if labels_a.ndim == 1:
        return (labels_a[:, None] == labels_b[None, :]).astype(jnp.float32)

    if labels_a.shape[1] != labels_b.shape[1]:
        raise ValueError(
            f"Multi-hot labels have {labels_a.shape[1]} and {labels_b.shape[1]} columns; they "
            "must have the same number of labels."
        )
    shared = (labels_a > 0).astype(jnp.float32) @ (labels_b > 0).astype(jnp.float32).T
    return (shared > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# ADSH
# ---------------------------------------------------------------------------------------------


def adsh_loss(
    u,
    batch_labels,
    batch_indices,
    B,
    db_labels,
    gamma: float,
    num_sampled: int,
    scale: float = ADSH_LOSS_SCALE,
) -> jax.Array:
    """Compute the ADSH minibatch loss of the network outputs against the database codes.

    L = scale / (c * |M| * n) * [ sum_i sum_j (c * S_ij - u_i . b_j)^2
                                  + gamma * sum_i ||u_i - b_{idx_i}||^2 ]

    with i over the m minibatch images, j over the n database rows of B, c = bits per code and
    S_ij in {0, 1}. The normaliser uses the size |M| of the sampled set of the outer iteration,
    not the minibatch size m, and the number n of database rows (as the reference release
    does, with scale = 12). So summing this loss over the minibatches of one pass over the
    sampled set gives scale / (c |M| n) times the full objective of ``adsh_objective``, and the
    gradient of one minibatch does not depend on how the others are batched.

    Args:
      u: float [m, c], network outputs (tanh) for the minibatch.
      batch_labels: int [m] or multi-hot [m, L].
      batch_indices: int [m], row of each minibatch image in B.
      B: int8 or float32 [n, c] with entries in {-1, +1}, database codes; no gradient flows
        into B.
      db_labels: int [n] or multi-hot [n, L], labels of the rows of B.
      gamma: weight of the quantisation term (200 in the release).
      num_sampled: |M|, number of images sampled in the outer iteration.
      scale: constant factor (12 in the release).

    Returns:
      float32 scalar.
    """
    _check_float_matrix("u", u)
    _check_code_matrix("B", B)
    batch, bits = u.shape
    items = B.shape[0]
    if B.shape[1] != bits:
        raise ValueError(
            f"u has {bits} bits but B has {B.shape[1]} columns. Size B with the head's "
            "num_loss_bits (main plus auxiliary bits)."
        )
    _check_labels("batch_labels", batch_labels, batch)
    _check_labels("db_labels", db_labels, items)
    _check_indices("batch_indices", batch_indices, batch)
    if isinstance(num_sampled, (int, np.integer)) and num_sampled < 1:
        raise ValueError(f"num_sampled must be >= 1, got {num_sampled}.")

    u = u.astype(jnp.float32)
    database_codes = jax.lax.stop_gradient(B.astype(jnp.float32))
    similarity = similarity_matrix(batch_labels, db_labels)

    inner = u @ database_codes.T
    square_term = jnp.sum(jnp.square(bits * similarity - inner))
    quantization_term = jnp.sum(jnp.square(u - database_codes[batch_indices]))

    normaliser = bits * jnp.asarray(num_sampled, jnp.float32) * items
    return scale * (square_term + gamma * quantization_term) / normaliser


@jax.jit
def adsh_objective(U, B, sampled_indices, sampled_labels, db_labels, gamma: float) -> jax.Array:
    """Compute the full ADSH objective ||U B^T - c S||^2 + gamma ||B[idx] - U||^2.

    Args:
      U: float [m, c], network outputs for all sampled images.
      B: int8 or float32 [n, c] in {-1, +1}.
      sampled_indices: int [m], rows of B of the sampled images.
      sampled_labels: int [m] or multi-hot [m, L].
      db_labels: int [n] or multi-hot [n, L].
      gamma: quantisation weight.

    Returns:
      float32 scalar (unnormalised); ``adsh_dcc_update`` never increases it.
    """
    _check_float_matrix("U", U)
    _check_code_matrix("B", B)
    _check_indices("sampled_indices", sampled_indices, U.shape[0])
    bits = U.shape[1]
    U = U.astype(jnp.float32)
    codes = B.astype(jnp.float32)
    similarity = similarity_matrix(sampled_labels, db_labels)
    square_term = jnp.sum(jnp.square(U @ codes.T - bits * similarity))
    quantization_term = jnp.sum(jnp.square(codes[sampled_indices] - U))
    return square_term + gamma * quantization_term


@jax.jit
def _dcc_sweep(codes, U, sampled_indices, similarity, gamma):
    items, bits = codes.shape

    # Q = c * S^T U + gamma * U_scattered, where U_scattered [n, c] contains u_i at row idx_i.
    scattered = jnp.zeros((items, bits), jnp.float32).at[sampled_indices].add(U)
    target = bits * similarity.T @ U + gamma * scattered
    gram = U.T @ U

    def update_bit(bit, codes):
        # B[:, not k] U[:, not k]^T U[:, k] = B (U^T U[:, k]) - B[:, k] (U[:, k] . U[:, k]).
        gram_column = jax.lax.dynamic_index_in_dim(gram, bit, axis=1, keepdims=False)
        current = jax.lax.dynamic_index_in_dim(codes, bit, axis=1, keepdims=False)
        cross = codes @ gram_column - current * gram_column[bit]
        target_column = jax.lax.dynamic_index_in_dim(target, bit, axis=1, keepdims=False)
        new_column = jnp.where(target_column - cross >= 0, 1.0, -1.0).astype(jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(codes, new_column, bit, axis=1)

    return jax.lax.fori_loop(0, bits, update_bit, codes)


@jax.jit
def adsh_dcc_update(B, U, sampled_indices, sampled_labels, db_labels, gamma: float) -> jax.Array:
    """Update the database codes by one sweep of discrete cyclic coordinate descent.

    Minimises ``adsh_objective`` over B one column at a time with the other columns fixed:
    Q = c S^T U + gamma U_scattered, and for each bit k,
    B[:, k] = sign(Q[:, k] - B[:, not k] U[:, not k]^T U[:, k]), with sign(0) = +1. Each column
    update is the exact minimiser, so the objective never increases. Repeated sampled indices
    are handled by summing their outputs into U_scattered, which is the exact minimiser for the
    quantisation term with one term per sample.

    Args:
      B: int8 or float32 [n, c] in {-1, +1}, current database codes.
      U: float [m, c], network outputs for all sampled images of the outer iteration.
      sampled_indices: int [m], their rows in B.
      sampled_labels: int [m] or multi-hot [m, L].
      db_labels: int [n] or multi-hot [n, L].
      gamma: quantisation weight.

    Returns:
      The new B, same dtype and shape as ``B``. The function is jitted; the checks on shapes
      and dtypes run when it is traced.
    """
    _check_code_matrix("B", B)
    _check_float_matrix("U", U)
    if U.shape[1] != B.shape[1]:
        raise ValueError(f"U has {U.shape[1]} bits but B has {B.shape[1]} columns.")
    _check_indices("sampled_indices", sampled_indices, U.shape[0])
    _check_labels("sampled_labels", sampled_labels, U.shape[0])
    _check_labels("db_labels", db_labels, B.shape[0])

    similarity = similarity_matrix(sampled_labels, db_labels)
    updated = _dcc_sweep(
        B.astype(jnp.float32),
        U.astype(jnp.float32),
        sampled_indices,
        similarity,
        jnp.asarray(gamma, jnp.float32),
    )
    return updated.astype(B.dtype)


# ---------------------------------------------------------------------------------------------
# Symmetric objective
# ---------------------------------------------------------------------------------------------


def symmetric_loss(
    codes,
    labels,
    *,
    similarity_weight: float = 1.0,
    quantization_weight: float = 0.1,
    form: str = "pairwise_mse",
    centers=None,
) -> jax.Array:
    """Compute an in-batch pairwise hashing loss in which the network encodes both sides.

    similarity_weight * L_sim + quantization_weight * L_q, over the m * (m - 1) ordered pairs of
    distinct images of the batch:

    - form "pairwise_mse": L_sim = mean_{i != j} (h_i . h_j / c - S_ij)^2. This is the ADSH
      regression of the inner product to c S_ij with the network on both sides, divided by c^2
      so the loss does not grow with the code length. The two objectives then differ only in
      who produces the database side. For sign codes at Hamming distance d,
      h_i . h_j = c - 2d, so the term is 4 (d/c)^2 for a similar pair and (1 - 2d/c)^2 for a
      dissimilar one: similar pairs are pulled together and dissimilar pairs to distance c/2,
      which many classes can meet at once (for example with the rows of a Hadamard matrix).
      The target c (2 S - 1), which pushes dissimilar pairs to distance c, cannot be met by
      three or more mutually dissimilar classes, so its minimum stays above zero.
    - form "pairwise_balanced": the same squared error, but the similar and the dissimilar pairs
      are averaged separately and the two means added. With C balanced classes only about 1/C
      of the pairs are similar, so the plain mean mostly pushes codes apart. The balanced
      mean gives both kinds of pair equal weight.
    - form "centers": central similarity (Yuan et al., CVPR 2020). Every class has a fixed
      target code (`centers`, from `aqhash_jax.hash_centers.make_hash_centers`) and
      L_sim = mean over images and bits of the binary cross-entropy between (h + 1) / 2 and
      (center_y + 1) / 2. A multi-hot label targets the sign of the sum of its classes' centres.
      Pairs are implied by the centres, so the term does not depend on the batch composition.
    - form "dpsh": the negative log-likelihood of DPSH (Li et al., IJCAI 2016),
      L_sim = mean_{i != j} [log(1 + exp(theta_ij)) - S_ij theta_ij] with theta_ij = h_i . h_j / 2.
      It saturates for well-separated pairs, so it tolerates label noise better than the
      regression but gives weaker gradients once pairs are ranked correctly.

    L_q = mean_i ||h_i - sign(h_i)||^2 / c pulls the continuous codes to the corners so that
    sign() changes the distances little.

    Args:
      codes: float [m, c] continuous codes in (-1, 1) (main and auxiliary bits).
      labels: int [m] or multi-hot [m, L].
      similarity_weight: config ``loss.similarity_weight``.
      quantization_weight: config ``loss.quantization_weight``.
      form: config ``loss.symmetric_form``: one of "pairwise_mse", "pairwise_balanced", "dpsh"
        and "centers".
      centers: float or int [num_classes, c] in {-1,+1}, needed by form "centers" only.

    Returns:
      float32 scalar; a batch of one image has no pairs and contributes only L_q.
    """
    _check_float_matrix("codes", codes)
    batch, bits = codes.shape
    _check_labels("labels", labels, batch)
    if form not in SYMMETRIC_FORMS:
        raise ValueError(f"form must be one of {SYMMETRIC_FORMS}, got {form!r}.")

    codes = codes.astype(jnp.float32)
    similarity = similarity_matrix(labels, labels)
    inner = codes @ codes.T
    off_diagonal = 1.0 - jnp.eye(batch, dtype=jnp.float32)
    num_pairs = jnp.maximum(jnp.sum(off_diagonal), 1.0)

    if form == "centers":
        similarity_term = _center_loss(codes, labels, centers)
    elif form == "pairwise_balanced":
        pair_loss = jnp.square(inner / bits - similarity)
        positive = similarity * off_diagonal
        negative = (1.0 - similarity) * off_diagonal
        similarity_term = jnp.sum(pair_loss * positive) / jnp.maximum(jnp.sum(positive), 1.0)
        similarity_term += jnp.sum(pair_loss * negative) / jnp.maximum(jnp.sum(negative), 1.0)
    else:
        if form == "pairwise_mse":
            pair_loss = jnp.square(inner / bits - similarity)
        else:
            theta = 0.5 * inner
            pair_loss = jax.nn.softplus(theta) - similarity * theta
        similarity_term = jnp.sum(pair_loss * off_diagonal) / num_pairs

    signs = jax.lax.stop_gradient(jnp.where(codes >= 0, 1.0, -1.0))
    quantization_term = jnp.mean(jnp.sum(jnp.square(codes - signs), axis=-1)) / bits

    return similarity_weight * similarity_term + quantization_weight * quantization_term


def _center_loss(codes: jax.Array, labels: jax.Array, centers) -> jax.Array:
    """Mean binary cross-entropy between codes [m, c] and their class centres [C, c]."""
    if centers is None:
        raise ValueError("form 'centers' needs centers [num_classes, c]; build them with make_hash_centers.")
    centers = jnp.asarray(centers, jnp.float32)
    if centers.ndim != 2 or centers.shape[1] != codes.shape[1]:
        raise ValueError(
            f"centers have shape {centers.shape} but the codes have {codes.shape[1]} bits; build "
            "centres for the main plus auxiliary bits."
        )
    if labels.ndim == 1:
        targets = centers[labels.astype(jnp.int32)]
    else:
        targets = jnp.where(labels.astype(jnp.float32) @ centers >= 0, 1.0, -1.0)
    targets = (targets + 1.0) / 2.0

    # log sigmoid of the logit 2 artanh(h) equals log((1 + h) / 2), computed stably in log space.
    log_positive = jnp.log1p(jnp.clip(codes, -1.0 + 1e-6, 1.0)) - jnp.log(2.0)
    log_negative = jnp.log1p(-jnp.clip(codes, -1.0, 1.0 - 1e-6)) - jnp.log(2.0)
    return -jnp.mean(targets * log_positive + (1.0 - targets) * log_negative)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def loss_codes(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """Return the codes a hashing loss takes: "codes" [B, K] followed by "aux_codes" [B, A].

    Returns float [B, K + A]; just "codes" when the head returned no auxiliary bits (inference,
    aux="none", or a rolled branch with one copy).
    """
    if "codes" not in outputs:
        raise ValueError(f"outputs must contain 'codes', got keys {sorted(outputs)}.")
    codes = outputs["codes"]
    aux_codes = outputs.get("aux_codes")
    if aux_codes is None:
        return codes
    if aux_codes.shape[0] != codes.shape[0]:
        raise ValueError(
            f"'codes' {codes.shape} and 'aux_codes' {aux_codes.shape} have different batch sizes."
        )
    return jnp.concatenate([codes, aux_codes.astype(codes.dtype)], axis=-1)


def classification_loss(logits, labels) -> jax.Array:
    """Compute the mean classification loss of the head's "logits".

    Args:
      logits: float [B, num_classes].
      labels: int [B] class ids (softmax cross-entropy) or multi-hot [B, num_classes] in {0, 1}
        (sigmoid binary cross-entropy averaged over classes).

    Returns:
      float32 scalar, the mean over the batch; weight it with ``loss.classification_weight``.
    """
    _check_float_matrix("logits", logits)
    batch, num_classes = logits.shape
    _check_labels("labels", labels, batch)
    logits = logits.astype(jnp.float32)

    if labels.ndim == 1:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked)

    if labels.shape[1] != num_classes:
        raise ValueError(
            f"Multi-hot labels have {labels.shape[1]} columns but logits have {num_classes}."
        )
    targets = labels.astype(jnp.float32)
    per_class = jax.nn.softplus(logits) - targets * logits
    return jnp.mean(per_class)
