"""Retrieval baselines on pooled backbone features: cosine, LSH, ITQ and linear supervised hashing.

Every function takes numpy float32 feature matrices [n, dim] (one row per image) and returns
numpy results. Hashing baselines are fitted on the database features only (the training split in
the evaluation protocol of this project) and return int8 codes in {-1, +1} of shape [n, bits] for
the query set and the database, ready for `aqhash_jax.retrieval` metrics.

- `cosine_map_at_all`: mAP@all of the float features ranked by cosine similarity.
- `lsh_codes`: sign of Gaussian random projections of mean-centred features (Charikar 2002).
- `itq_codes`: PCA to the code length, then iterative quantization, which alternates between the
  codes and an orthogonal rotation that minimises the quantization error (Gong and Lazebnik,
  "Iterative Quantization: A Procrustean Approach to Learning Binary Codes", CVPR 2011).
- `linear_hash_codes`: a linear layer + tanh trained with AdamW on a class-balanced in-batch
  pairwise loss over the database labels, binarised with sign.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

__all__ = [
    "ItqModel",
    "LinearHashModel",
    "cosine_map_at_all",
    "fit_itq",
    "fit_linear_hash",
    "itq_codes",
    "linear_hash_codes",
    "lsh_codes",
]


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_features(name: str, features) -> np.ndarray:
    """Validate a float32 feature matrix [n, dim] with n >= 1, dim >= 1 and finite values."""
    if not isinstance(features, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy array, got {type(features).__name__}; convert it with "
            "np.asarray(..., dtype=np.float32)."
        )
    if features.dtype != np.float32:
        raise ValueError(
            f"{name} must have dtype float32, got {features.dtype}; convert it with "
            f"{name}.astype(np.float32)."
        )
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, dim] with n, dim >= 1, got shape {features.shape}.")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the feature extraction.")
    return features


def _check_pair(query_features, db_features) -> tuple[np.ndarray, np.ndarray]:
    query_features = _check_features("query_features", query_features)
    db_features = _check_features("db_features", db_features)
    if query_features.shape[1] != db_features.shape[1]:
        raise ValueError(
            f"query_features and db_features must have the same feature dimension, got "
            f"{query_features.shape[1]} and {db_features.shape[1]}."
        )
    return query_features, db_features


def _check_labels(name: str, labels, num_rows: int, rows_name: str) -> np.ndarray:
    """Validate integer class labels [n] matching `num_rows` feature rows."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(labels).__name__}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must have an integer dtype (one class id per row), got {labels.dtype}; "
            "multi-label targets are not supported by these baselines."
        )
    if labels.shape != (num_rows,):
        raise ValueError(f"{name} must have shape ({num_rows},) to match {rows_name}, got shape {labels.shape}.")
    return labels


def _check_bits(bits, dim: int | None = None, num_rows: int | None = None) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int, got {bits!r} of type {type(bits).__name__}.")
    if bits < 1:
        raise ValueError(f"bits must be at least 1, got {bits}.")
    if dim is not None and bits > dim:
        raise ValueError(
            f"bits={bits} exceeds the feature dimension {dim}; PCA cannot produce more components "
            "than feature dimensions, so choose a shorter code length."
        )
    if num_rows is not None and bits > num_rows:
        raise ValueError(
            f"bits={bits} exceeds the number of database rows {num_rows}; PCA needs at least as many "
            "rows as components."
        )
    return int(bits)


def _sign(values: np.ndarray) -> np.ndarray:
    """Map values >= 0 to +1 and values < 0 to -1 as int8 (same convention as `sign_codes`)."""
    return np.where(values >= 0, 1, -1).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# Cosine similarity on float features


def cosine_map_at_all(
    query_features: np.ndarray,
    db_features: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    chunk_size: int = 256,
) -> float:
    """Compute mAP@all of the database ranked by cosine similarity to each query.

    Ties in float similarity have probability zero for real features, so a stable descending sort
    ranks the database (ties, if any, keep database order). Queries are processed in chunks of
    `chunk_size` rows, so memory is O(chunk_size * n_db).

    Args:
      query_features: float32 [n_query, dim].
      db_features: float32 [n_db, dim].
      query_labels: int [n_query] class ids.
      db_labels: int [n_db] class ids.
      chunk_size: queries per chunk.

    Returns:
      Mean over queries of average precision over the whole database. A query with no relevant
      database item has AP 0 and still counts in the mean.
    """
    query_features, db_features = _check_pair(query_features, db_features)
    query_labels = _check_labels("query_labels", query_labels, query_features.shape[0], "query_features")
    db_labels = _check_labels("db_labels", db_labels, db_features.shape[0], "db_features")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")

    # Zero rows have no direction; they stay zero and rank by database order.
    query_unit = _l2_normalize(query_features)
    db_unit = _l2_normalize(db_features)
    ranks = np.arange(1, db_features.shape[0] + 1, dtype=np.float64)

    average_precisions = np.empty(query_features.shape[0], dtype=np.float64)
    for start in range(0, query_features.shape[0], chunk_size):
        stop = min(start + chunk_size, query_features.shape[0])
        similarity = query_unit[start:stop] @ db_unit.T
        order = np.argsort(-similarity, axis=1, kind="stable")
        relevant = db_labels[order] == query_labels[start:stop, None]

        hits = np.cumsum(relevant, axis=1, dtype=np.float64)
        precision_at_hits = np.where(relevant, hits / ranks, 0.0)
        num_relevant = hits[:, -1]
        average_precisions[start:stop] = np.divide(
            precision_at_hits.sum(axis=1), num_relevant, out=np.zeros_like(num_relevant), where=num_relevant > 0
        )
    return float(average_precisions.mean())


def _l2_normalize(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------------------------
# Random-projection LSH


def lsh_codes(
    query_features: np.ndarray, db_features: np.ndarray, bits: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hash by the sign of Gaussian random projections of features centred on the database mean.

    Args:
      query_features: float32 [n_query, dim].
      db_features: float32 [n_db, dim]; their mean is subtracted from both sets.
      bits: code length.
      seed: seed of the projection matrix.

    Returns:
      (query_codes int8 [n_query, bits], db_codes int8 [n_db, bits]) with values in {-1, +1}.
    """
    query_features, db_features = _check_pair(query_features, db_features)
    bits = _check_bits(bits)

    mean = db_features.astype(np.float64).mean(axis=0)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((db_features.shape[1], bits))

    query_codes = _sign((query_features - mean) @ projection)
    db_codes = _sign((db_features - mean) @ projection)
    return query_codes, db_codes


# ---------------------------------------------------------------------------------------------
# ITQ


@dataclasses.dataclass(frozen=True)
class ItqModel:
    """A fitted ITQ hash function: code = sign((x - mean) @ pca_components @ rotation).

    Attributes:
      mean: float64 [dim], mean of the database features.
      pca_components: float64 [dim, bits], top principal directions, largest variance first.
      rotation: float64 [bits, bits], orthogonal.
      quantization_errors: float64 [iterations + 1], ||B - V R||_F^2 / n_db before each rotation
        update and after the last one (non-increasing).
    """

    mean: np.ndarray
    pca_components: np.ndarray
    rotation: np.ndarray
    quantization_errors: np.ndarray

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Hash float32 features [n, dim] to int8 codes [n, bits] in {-1, +1}."""
        features = _check_features("features", features)
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features have dimension {features.shape[1]}, but this ITQ model was fitted on "
                f"dimension {self.mean.shape[0]}."
            )
        return _sign((features - self.mean) @ self.pca_components @ self.rotation)


def fit_itq(db_features: np.ndarray, bits: int, *, seed: int, iterations: int = 50) -> ItqModel:
    """Fit ITQ: PCA to `bits` dimensions, then `iterations` alternating updates of codes and rotation.

    With V the PCA-projected centred data [n, bits], each iteration sets B = sign(V R) and then
    solves the orthogonal Procrustes problem min_R ||B - V R||_F over orthogonal R: with the SVD
    B^T V = U S W^T, the minimiser is R = W U^T.

    Args:
      db_features: float32 [n_db, dim], with bits <= min(n_db, dim).
      bits: code length.
      seed: seed of the random orthogonal initial rotation.
      iterations: number of rotation updates.
    """
    db_features = _check_features("db_features", db_features)
    bits = _check_bits(bits, dim=db_features.shape[1], num_rows=db_features.shape[0])
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}.")

    # PCA on the database, in float64 for a stable eigendecomposition.
    data = db_features.astype(np.float64)
    mean = data.mean(axis=0)
    centred = data - mean
    covariance = centred.T @ centred / data.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    components = eigenvectors[:, np.argsort(eigenvalues)[::-1][:bits]]
    projected = centred @ components

    # Random orthogonal start: Q of the QR decomposition of a Gaussian matrix.
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))

    errors = []
    for _ in range(iterations):
        codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
        errors.append(_quantization_error(codes, projected, rotation))
        u, _, wt = np.linalg.svd(codes.T @ projected)
        rotation = wt.T @ u.T
    codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
    errors.append(_quantization_error(codes, projected, rotation))

    return ItqModel(mean=mean, pca_components=components, rotation=rotation, quantization_errors=np.asarray(errors))


def _quantization_error(codes: np.ndarray, projected: np.ndarray, rotation: np.ndarray) -> float:
    return float(np.sum((codes - projected @ rotation) ** 2) / codes.shape[0])


def itq_codes(
    query_features: np.ndarray, db_features: np.ndarray, bits: int, *, seed: int = 0, iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ITQ on the database features and hash both sets.

    Returns:
      (query_codes int8 [n_query, bits], db_codes int8 [n_db, bits]) with values in {-1, +1}.
    """
    query_features, db_features = _check_pair(query_features, db_features)
    model = fit_itq(db_features, bits, seed=seed, iterations=iterations)
    return model.encode(query_features), model.encode(db_features)


# ---------------------------------------------------------------------------------------------
# Linear supervised hashing


@dataclasses.dataclass(frozen=True)
class LinearHashModel:
    """A trained linear hash function: code = sign(((x - mean) / scale) @ kernel + bias).

    Attributes:
      mean: float32 [dim], mean of the database features.
      scale: float, root mean square of the centred database features (one number for all dims).
      kernel: float32 [dim, bits].
      bias: float32 [bits].
      epoch_losses: float32 [epochs], mean training loss of each epoch.
    """

    mean: np.ndarray
    scale: float
    kernel: np.ndarray
    bias: np.ndarray
    epoch_losses: np.ndarray

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Hash float32 features [n, dim] to int8 codes [n, bits] in {-1, +1}."""
        features = _check_features("features", features)
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features have dimension {features.shape[1]}, but this linear hash model was trained "
                f"on dimension {self.mean.shape[0]}."
            )
        return _sign(((features - self.mean) / self.scale) @ self.kernel + self.bias)


def _pairwise_loss(params, features, labels, mask):
    """In-batch pairwise loss on tanh outputs u: balanced squared error between u_i.u_j / bits and s_ij.

    s_ij = +1 for images of the same class and -1 otherwise. Positive and negative pairs are
    averaged separately and weighted equally, because with many classes almost every pair in a
    batch is negative. Self-pairs and padded rows (mask False) are left out.

    NOTE: with 100 classes this balanced form gives a far stronger hash than averaging over all
    pairs uniformly, so its mAP is not comparable with linear baselines trained that way.
    """
    outputs = jnp.tanh(features @ params["kernel"] + params["bias"])
    similarity = outputs @ outputs.T / outputs.shape[1]

    same_class = labels[:, None] == labels[None, :]
    valid = mask[:, None] & mask[None, :] & ~jnp.eye(labels.shape[0], dtype=bool)
    positive = valid & same_class
    negative = valid & ~same_class

    squared_error_positive = jnp.where(positive, (similarity - 1.0) ** 2, 0.0)
    squared_error_negative = jnp.where(negative, (similarity + 1.0) ** 2, 0.0)
    loss_positive = squared_error_positive.sum() / jnp.maximum(positive.sum(), 1)
    loss_negative = squared_error_negative.sum() / jnp.maximum(negative.sum(), 1)
    return loss_positive + loss_negative


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _train_step(params, opt_state, features, labels, mask, optimizer):
    loss, grads = jax.value_and_grad(_pairwise_loss)(params, features, labels, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


def fit_linear_hash(
    db_features: np.ndarray,
    db_labels: np.ndarray,
    bits: int,
    *,
    seed: int,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
) -> LinearHashModel:
    """Train a linear layer + tanh on the database features with an in-batch pairwise loss.

    Features are centred on the database mean and divided by their root mean square. Each epoch
    visits the database once in a random order, in batches of `batch_size` (the last batch is
    padded and masked). The optimiser is AdamW with a constant learning rate.

    Args:
      db_features: float32 [n_db, dim].
      db_labels: int [n_db] class ids.
      bits: code length.
      seed: seed of the initial weights and of the batch order; equal seeds give equal models on
        the same JAX backend.
      epochs, batch_size, learning_rate, weight_decay: training settings.
    """
    db_features = _check_features("db_features", db_features)
    db_labels = _check_labels("db_labels", db_labels, db_features.shape[0], "db_features")
    bits = _check_bits(bits)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    num_rows, dim = db_features.shape

    # Centre and scale, so one learning rate suits backbones with different feature magnitudes.
    mean = db_features.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = db_features - mean
    scale = float(np.sqrt(np.mean(np.square(centred, dtype=np.float64))))
    if scale == 0.0:
        raise ValueError("db_features are constant across rows, so there is nothing to learn a hash from.")
    normalized = centred / np.float32(scale)

    # Glorot-style initialisation of the kernel, zero bias.
    key = jax.random.PRNGKey(seed)
    params = {
        "kernel": jax.random.normal(key, (dim, bits), jnp.float32) * np.float32(np.sqrt(2.0 / (dim + bits))),
        "bias": jnp.zeros((bits,), jnp.float32),
    }
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    # Batches have a fixed shape (padded, with a mask), so the step compiles once.
    batch_size = min(int(batch_size), num_rows)
    num_batches = -(-num_rows // batch_size)
    padded_rows = num_batches * batch_size
    rng = np.random.default_rng(seed)
    labels32 = db_labels.astype(np.int32)

    epoch_losses = np.empty(epochs, dtype=np.float32)
    for epoch in range(epochs):
        order = rng.permutation(num_rows)
        order = np.concatenate([order, np.zeros(padded_rows - num_rows, dtype=order.dtype)])
        mask = np.arange(padded_rows) < num_rows
        batch_losses = []
        for batch in range(num_batches):
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            params, opt_state, loss = _train_step(
                params,
                opt_state,
                normalized[order[rows]],
                labels32[order[rows]],
                mask[rows],
                optimizer,
            )
            batch_losses.append(loss)
        epoch_losses[epoch] = float(np.mean(jax.device_get(batch_losses)))
        if (epoch + 1) % 25 == 0 or epoch == epochs - 1:
            logging.info("linear hash, %d bits: epoch %d/%d, loss %.4f", bits, epoch + 1, epochs, epoch_losses[epoch])

    params = jax.device_get(params)
    return LinearHashModel(
        mean=mean,
        scale=scale,
        kernel=np.asarray(params["kernel"], dtype=np.float32),
        bias=np.asarray(params["bias"], dtype=np.float32),
        epoch_losses=epoch_losses,
    )


def linear_hash_codes(
    query_features: np.ndarray,
    db_features: np.ndarray,
    db_labels: np.ndarray,
    bits: int,
    *,
    seed: int = 0,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Train the linear supervised hash on the database and hash both sets.

    Returns:
      (query_codes int8 [n_query, bits], db_codes int8 [n_db, bits]) with values in {-1, +1}.
    """
    query_features, db_features = _check_pair(query_features, db_features)
    model = fit_linear_hash(
        db_features,
        db_labels,
        bits,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
    )
    return model.encode(query_features), model.encode(db_features)
