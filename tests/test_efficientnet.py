"""Tests for the EfficientNet-Lite backbone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.models import efficientnet
from aqhash_jax.models.efficientnet import EfficientNetLite


def _shapes(module, images_shape, train=False):
    images = jax.ShapeDtypeStruct(images_shape, jnp.float32)
    variables = jax.eval_shape(functools.partial(module.init, train=train), jax.random.key(0), images)
    outputs = jax.eval_shape(functools.partial(module.apply, train=False), variables, images)
    return variables, outputs


# Stage widths and depths of the Lite variants (TensorFlow TPU model garden, efficientnet_lite).
EXPECTED_LAYOUT = {
    "lite0": [(1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320)],
    "lite1": [(1, 16), (3, 24), (3, 40), (4, 80), (4, 112), (5, 192), (1, 320)],
    "lite2": [(1, 16), (3, 24), (3, 48), (4, 88), (4, 120), (5, 208), (1, 352)],
    "lite3": [(1, 24), (3, 32), (3, 48), (5, 96), (5, 136), (6, 232), (1, 384)],
    "lite4": [(1, 24), (4, 32), (4, 56), (6, 112), (6, 160), (8, 272), (1, 448)],
}


@pytest.mark.parametrize("variant", sorted(EXPECTED_LAYOUT))
def test_stage_layout_per_variant(variant):
    layout = [(stage.repeats, stage.features) for stage in efficientnet.stage_layout(variant)]
    assert layout == EXPECTED_LAYOUT[variant]


def test_lite0_output_shapes_and_size():
    variables, outputs = _shapes(EfficientNetLite(include_top=True), (2, 224, 224, 3))

    assert [m.shape for m in outputs["feature_maps"]] == [(2, 14, 14, 112), (2, 7, 7, 1280)]
    assert outputs["pooled"].shape == (2, 1280)
    assert outputs["logits"].shape == (2, 1000)
    assert set(variables) == {"params", "batch_stats"}
    parameter_count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    assert parameter_count == 4_652_008


def test_no_logits_without_top():
    variables, outputs = _shapes(EfficientNetLite(), (1, 224, 224, 3))

    assert "logits" not in outputs
    assert "classifier" not in variables["params"]


@pytest.mark.parametrize("variant", ["lite2", "lite4"])
def test_scaled_variant_keeps_stem_and_head(variant):
    size = efficientnet.default_resolution(variant)
    variables, outputs = _shapes(EfficientNetLite(variant=variant), (1, size, size, 3))

    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert outputs["pooled"].shape == (1, 1280)
    stride16 = EXPECTED_LAYOUT[variant][efficientnet.STRIDE16_STAGE][1]
    assert outputs["feature_maps"][0].shape == (1, -(-size // 16), -(-size // 16), stride16)
    assert outputs["feature_maps"][1].shape == (1, -(-size // 32), -(-size // 32), 1280)


def test_odd_input_size_rounds_up():
    _, outputs = _shapes(EfficientNetLite(), (1, 100, 130, 3))

    assert outputs["feature_maps"][0].shape[1:3] == (7, 9)
    assert outputs["feature_maps"][1].shape[1:3] == (4, 5)


def test_input_normalization_maps_to_unit_range():
    mean, std = efficientnet.input_normalization("efficientnet_lite0")
    pixels = np.array([0.0, 127.5, 255.0])

    np.testing.assert_allclose((pixels - mean) / std, [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="variant"):
        efficientnet.input_normalization("resnet50")


def test_rejects_bad_images():
    module = EfficientNetLite()
    with pytest.raises(ValueError, match="batch, H, W, 3"):
        _shapes(module, (224, 224, 3))
    with pytest.raises(ValueError, match="floating point"):
        jax.eval_shape(
            functools.partial(module.init, train=False),
            jax.random.key(0),
            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8),
        )
    with pytest.raises(ValueError, match="variant"):
        _shapes(EfficientNetLite(variant="b0"), (1, 64, 64, 3))


@pytest.mark.slow
def test_impls_agree_and_train_updates_batch_stats():
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32))
    fast = EfficientNetLite(conv_impl="fast")
    native = EfficientNetLite(conv_impl="native")
    variables = jax.jit(functools.partial(fast.init, train=False))(jax.random.key(0), images)

    # One compilation for all runs, because compiling dominates the time of this test.
    @jax.jit
    def run(variables, images):
        eval_fast = fast.apply(variables, images, train=False)
        eval_native = native.apply(variables, images, train=False)
        train_fast, updates = fast.apply(variables, images, train=True, mutable=["batch_stats"])
        # Gradients in inference mode: batch statistics of 2 tiny images would make train-mode
        # gradients too ill-conditioned to compare the two formulations.
        grads = {
            name: jax.grad(
                lambda p, m=module: jnp.sum(
                    m.apply(
                        {"params": p, "batch_stats": variables["batch_stats"]}, images, train=False
                    )["pooled"]
                )
            )(variables["params"])
            for name, module in (("native", native), ("fast", fast))
        }
        return eval_fast, eval_native, train_fast, updates, grads["native"], grads["fast"]

    eval_fast, eval_native, train_fast, updates, grads_native, grads_fast = run(variables, images)

    for got, want in zip(eval_fast["feature_maps"], eval_native["feature_maps"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(eval_fast["pooled"]), np.asarray(eval_native["pooled"]), rtol=1e-4, atol=1e-4
    )
    for got, want in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_native)):
        scale = float(np.max(np.abs(want))) + 1e-6
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-3 * scale)

    old_mean = np.asarray(variables["batch_stats"]["stem_bn"]["mean"])
    new_mean = np.asarray(updates["batch_stats"]["stem_bn"]["mean"])
    assert not np.allclose(old_mean, new_mean)
    # Running statistics move 1% of the way to the batch statistics (momentum 0.99).
    assert np.max(np.abs(new_mean - old_mean)) < 0.05
    assert not np.allclose(np.asarray(train_fast["pooled"]), np.asarray(eval_fast["pooled"]))


def test_drop_path_needs_dropout_rng():
    module = EfficientNetLite(drop_path_rate=0.2)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), images)

    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(
            functools.partial(module.apply, train=True, mutable=["batch_stats"]), variables, images
        )

    outputs, _ = jax.eval_shape(
        functools.partial(
            module.apply, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
        ),
        variables,
        images,
    )
    assert outputs["pooled"].shape == (1, 1280)
