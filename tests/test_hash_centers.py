"""Tests for class hash centres and the symmetric loss forms that use class structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax import losses
from aqhash_jax.hash_centers import make_hash_centers, min_center_distance


@pytest.mark.parametrize(
    "num_classes, code_length, expected_min_distance",
    [(100, 12, 4), (100, 24, 8), (100, 48, 16), (200, 8, 1), (2, 12, 6)],
)
def test_centers_min_distance(num_classes, code_length, expected_min_distance):
    centers = make_hash_centers(num_classes, code_length, seed=0)

    assert centers.shape == (num_classes, code_length)
    assert centers.dtype == np.int8
    assert set(np.unique(centers)) <= {-1, 1}
    assert len(np.unique(centers, axis=0)) == num_classes
    assert min_center_distance(centers) >= expected_min_distance


def test_centers_beat_random_codes_at_12_bits():
    random_codes = np.where(np.random.default_rng(0).random((100, 12)) < 0.5, -1, 1).astype(np.int8)

    assert min_center_distance(make_hash_centers(100, 12)) > min_center_distance(random_codes)


def test_centers_deterministic_for_seed():
    np.testing.assert_array_equal(make_hash_centers(50, 32, seed=3), make_hash_centers(50, 32, seed=3))
    assert not np.array_equal(make_hash_centers(50, 32, seed=3), make_hash_centers(50, 32, seed=4))


def test_centers_reject_too_many_classes():
    with pytest.raises(ValueError, match="longer code length"):
        make_hash_centers(300, 8)


def test_center_loss_minimal_at_centers():
    centers = make_hash_centers(4, 12).astype(np.float32)
    labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
    at_centers = jnp.asarray(centers)[labels] * 0.999
    at_other = jnp.asarray(centers)[(labels + 1) % 4] * 0.999

    loss_at = losses.symmetric_loss(at_centers, labels, form="centers", centers=centers)
    loss_other = losses.symmetric_loss(at_other, labels, form="centers", centers=centers)

    assert float(loss_at) < 0.01
    assert float(loss_other) > 1.0


def test_center_loss_needs_matching_centers():
    codes = jnp.zeros((4, 12))
    labels = jnp.array([0, 1, 2, 3])

    with pytest.raises(ValueError, match="needs centers"):
        losses.symmetric_loss(codes, labels, form="centers")
    with pytest.raises(ValueError, match="bits"):
        losses.symmetric_loss(codes, labels, form="centers", centers=np.ones((4, 16), np.float32))


def test_balanced_pairs_weight_rare_positives():
    # One similar pair among 8 images: it barely moves the plain mean but weighs half in the balanced one.
    labels = jnp.array([0, 0, 1, 2, 3, 4, 5, 6])
    codes = jnp.tanh(jax.random.normal(jax.random.PRNGKey(0), (8, 16)))
    apart = codes.at[1].set(-codes[0])

    def similar_pair_effect(form):
        close = losses.symmetric_loss(codes.at[1].set(codes[0]), labels, form=form, quantization_weight=0.0)
        far = losses.symmetric_loss(apart, labels, form=form, quantization_weight=0.0)
        return float(far - close)

    assert similar_pair_effect("pairwise_balanced") > 5 * similar_pair_effect("pairwise_mse")


@pytest.mark.parametrize("form", ["pairwise_balanced", "centers"])
def test_new_forms_have_finite_gradients(form):
    centers = make_hash_centers(3, 8).astype(np.float32)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    raw = jax.random.normal(jax.random.PRNGKey(1), (6, 8))

    def loss(values):
        return losses.symmetric_loss(jnp.tanh(values), labels, form=form, centers=centers)

    gradient = jax.grad(loss)(raw)
    assert bool(jnp.all(jnp.isfinite(gradient)))
    assert float(jnp.abs(gradient).sum()) > 0
