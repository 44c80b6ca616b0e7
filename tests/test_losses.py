"""Tests for the hashing objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.losses import (
    adsh_dcc_update,
    adsh_loss,
    adsh_objective,
    classification_loss,
    loss_codes,
    similarity_matrix,
    symmetric_loss,
)


def random_problem(seed, items=40, sampled=12, bits=10, classes=5):
    rng = np.random.default_rng(seed)
    db_labels = rng.integers(0, classes, size=items).astype(np.int32)
    codes = np.where(rng.standard_normal((items, bits)) >= 0, 1, -1).astype(np.int8)
    indices = rng.choice(items, size=sampled, replace=False).astype(np.int32)
    outputs = np.tanh(rng.standard_normal((sampled, bits)) * 2).astype(np.float32)
    return outputs, indices, db_labels[indices], codes, db_labels


def reference_adsh_loss(u, batch_labels, indices, codes, db_labels, gamma, num_sampled):
    bits = u.shape[1]
    total = 0.0
    for i in range(u.shape[0]):
        for j in range(codes.shape[0]):
            similar = float(batch_labels[i] == db_labels[j])
            total += (bits * similar - float(u[i] @ codes[j])) ** 2
        total += gamma * float(np.sum((u[i] - codes[indices[i]]) ** 2))
    return 12.0 * total / (bits * num_sampled * codes.shape[0])


def test_similarity_matrix_class_ids():
    labels_a = np.array([0, 1, 2], np.int32)
    labels_b = np.array([2, 0, 0, 3], np.int32)
    expected = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(similarity_matrix(labels_a, labels_b), expected)


def test_similarity_matrix_multi_hot():
    labels_a = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    labels_b = np.array([[0, 0, 1], [0, 0, 0], [1, 1, 0]], np.float32)
    expected = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    np.testing.assert_array_equal(similarity_matrix(labels_a, labels_b), expected)
    with pytest.raises(ValueError, match="both"):
        similarity_matrix(np.array([0, 1], np.int32), labels_b)


def test_adsh_loss_matches_reference():
    u, indices, labels, codes, db_labels = random_problem(0)
    value = adsh_loss(u, labels, indices, codes, db_labels, gamma=200.0, num_sampled=30)
    expected = reference_adsh_loss(u, labels, indices, codes, db_labels, 200.0, 30)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)

    float_codes = codes.astype(np.float32)
    value_float = adsh_loss(u, labels, indices, float_codes, db_labels, gamma=200.0, num_sampled=30)
    np.testing.assert_allclose(float(value_float), expected, rtol=1e-5)


def test_adsh_loss_minibatches_sum_to_objective():
    u, indices, labels, codes, db_labels = random_problem(1)
    gamma, num_sampled = 50.0, u.shape[0]
    total = sum(
        float(adsh_loss(u[s], labels[s], indices[s], codes, db_labels, gamma, num_sampled))
        for s in (slice(0, 5), slice(5, 12))
    )
    objective = float(adsh_objective(u, codes, indices, labels, db_labels, gamma))
    bits, items = u.shape[1], codes.shape[0]
    np.testing.assert_allclose(total, 12.0 * objective / (bits * num_sampled * items), rtol=1e-5)


def test_adsh_loss_gradient_only_through_u():
    u, indices, labels, codes, db_labels = random_problem(2)
    float_codes = jnp.asarray(codes, jnp.float32)
    grad_u, grad_codes = jax.grad(
        lambda u, b: adsh_loss(u, labels, indices, b, db_labels, 200.0, 12), argnums=(0, 1)
    )(jnp.asarray(u), float_codes)
    assert np.all(np.isfinite(np.asarray(grad_u)))
    assert np.any(np.asarray(grad_u) != 0)
    np.testing.assert_array_equal(np.asarray(grad_codes), 0.0)


def test_adsh_loss_rejects_bad_inputs():
    u, indices, labels, codes, db_labels = random_problem(3)
    with pytest.raises(ValueError, match="num_loss_bits"):
        adsh_loss(u[:, :5], labels, indices, codes, db_labels, 200.0, 12)
    with pytest.raises(ValueError, match="int8 or float32"):
        adsh_loss(u, labels, indices, codes.astype(np.int32), db_labels, 200.0, 12)
    with pytest.raises(ValueError, match="float"):
        adsh_loss(np.sign(u).astype(np.int8), labels, indices, codes, db_labels, 200.0, 12)
    with pytest.raises(ValueError, match="batch_indices"):
        adsh_loss(u, labels, indices[:3], codes, db_labels, 200.0, 12)
    with pytest.raises(ValueError, match="class ids"):
        adsh_loss(u, labels.astype(np.float32), indices, codes, db_labels, 200.0, 12)
    with pytest.raises(ValueError, match="num_sampled"):
        adsh_loss(u, labels, indices, codes, db_labels, 200.0, 0)


@pytest.mark.parametrize("seed", range(5))
def test_dcc_update_never_increases_objective(seed):
    u, indices, labels, codes, db_labels = random_problem(seed, items=50, sampled=15, bits=12)
    gamma = [0.0, 1.0, 10.0, 200.0, 5.0][seed]
    current = codes
    objective = float(adsh_objective(u, current, indices, labels, db_labels, gamma))
    for _ in range(3):
        updated = adsh_dcc_update(current, u, indices, labels, db_labels, gamma)
        assert updated.dtype == np.int8
        assert set(np.unique(np.asarray(updated)).tolist()) <= {-1, 1}
        new_objective = float(adsh_objective(u, updated, indices, labels, db_labels, gamma))
        assert new_objective <= objective * (1 + 1e-6) + 1e-3
        current, objective = updated, new_objective


def test_dcc_update_matches_numpy_sweep():
    u, indices, labels, codes, db_labels = random_problem(7, items=30, sampled=10, bits=8)
    gamma = 20.0
    bits = u.shape[1]
    similarity = (labels[:, None] == db_labels[None, :]).astype(np.float64)
    scattered = np.zeros((codes.shape[0], bits))
    scattered[indices] = u
    target = bits * similarity.T @ u + gamma * scattered
    expected = codes.astype(np.float64).copy()
    for k in range(bits):
        others = [j for j in range(bits) if j != k]
        value = target[:, k] - expected[:, others] @ u[:, others].T @ u[:, k]
        expected[:, k] = np.where(value >= 0, 1, -1)

    updated = adsh_dcc_update(codes.astype(np.float32), u, indices, labels, db_labels, gamma)
    assert updated.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(updated), expected)


def test_dcc_update_sign_zero_is_plus_one():
    # With U = 0 every Q - cross term is 0, so every bit becomes +1.
    codes = -np.ones((6, 4), np.int8)
    outputs = np.zeros((3, 4), np.float32)
    indices = np.array([0, 2, 4], np.int32)
    labels = np.array([0, 1, 0, 1, 0, 1], np.int32)
    updated = adsh_dcc_update(codes, outputs, indices, labels[indices], labels, 200.0)
    np.testing.assert_array_equal(np.asarray(updated), 1)


def test_dcc_update_recovers_class_codes():
    """With outputs equal to class codes and large gamma, B takes the class codes."""
    rng = np.random.default_rng(4)
    class_codes = np.where(rng.standard_normal((3, 16)) >= 0, 1.0, -1.0).astype(np.float32)
    db_labels = np.repeat(np.arange(3), 4).astype(np.int32)
    indices = np.arange(12, dtype=np.int32)
    outputs = class_codes[db_labels]
    codes = np.where(rng.standard_normal((12, 16)) >= 0, 1, -1).astype(np.int8)
    for _ in range(2):
        codes = adsh_dcc_update(codes, outputs, indices, db_labels, db_labels, 200.0)
    np.testing.assert_array_equal(np.asarray(codes), class_codes[db_labels])


@pytest.mark.parametrize("form", ["pairwise_mse", "dpsh"])
def test_symmetric_loss_prefers_class_codes(form):
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    class_codes = np.where(rng.standard_normal((3, 12)) >= 0, 0.95, -0.95).astype(np.float32)
    good = class_codes[labels]
    bad = class_codes[np.array([0, 1, 2, 0, 1, 2])]
    loss_good = float(symmetric_loss(good, labels, form=form))
    loss_bad = float(symmetric_loss(bad, labels, form=form))
    assert loss_good < loss_bad

    grads = jax.grad(lambda c: symmetric_loss(c, labels, form=form))(jnp.asarray(bad))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_symmetric_loss_terms_and_weights():
    labels = np.array([0, 0, 1], np.int32)
    codes = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0]], np.float32)
    # Similar pairs have h.h = c and dissimilar pairs h.h = 0, and the quantisation error is 0.
    assert float(symmetric_loss(codes, labels, form="pairwise_mse")) == pytest.approx(0.0, abs=1e-7)

    half = codes * 0.5
    quantization_only = float(
        symmetric_loss(half, labels, similarity_weight=0.0, quantization_weight=1.0)
    )
    assert quantization_only == pytest.approx(0.25)
    similarity_only = float(symmetric_loss(half, labels, similarity_weight=1.0, quantization_weight=0.0))
    # The 2 similar ordered pairs have h.h/c = 0.25 against 1, the 4 dissimilar ones meet 0.
    assert similarity_only == pytest.approx(2 * 0.75**2 / 6)

    antipodal = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], np.float32)
    assert float(symmetric_loss(antipodal, labels, quantization_weight=0.0)) == pytest.approx(4 / 6)

    single = float(symmetric_loss(half[:1], labels[:1], quantization_weight=1.0))
    assert single == pytest.approx(0.25)
    with pytest.raises(ValueError, match="form"):
        symmetric_loss(codes, labels, form="csq")


def test_loss_codes_concatenates_aux_bits():
    codes = jnp.ones((3, 4))
    aux = -jnp.ones((3, 6))
    joined = loss_codes({"codes": codes, "aux_codes": aux})
    assert joined.shape == (3, 10)
    np.testing.assert_array_equal(np.asarray(joined[:, 4:]), -1.0)
    assert loss_codes({"codes": codes}).shape == (3, 4)
    with pytest.raises(ValueError, match="codes"):
        loss_codes({"aux_codes": aux})


def test_classification_loss_softmax_and_sigmoid():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 2], np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([log_probs[0, 0], log_probs[1, 2]])
    assert float(classification_loss(logits, labels)) == pytest.approx(expected, rel=1e-5)

    multi_hot = np.array([[1, 0, 1], [0, 0, 0]], np.float32)
    probs = 1 / (1 + np.exp(-logits))
    bce = -(multi_hot * np.log(probs) + (1 - multi_hot) * np.log(1 - probs)).mean()
    assert float(classification_loss(logits, multi_hot)) == pytest.approx(bce, rel=1e-5)

    with pytest.raises(ValueError, match="columns"):
        classification_loss(logits, multi_hot[:, :2])
