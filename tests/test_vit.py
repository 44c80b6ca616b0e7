"""Tests for the Vision Transformer backbone."""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.models import vit

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8)


def _random_images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def _randomize(params, seed=0, scale=0.2):
    """Replace every param with Gaussian noise so zero-initialised weights (cls, head) matter."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(0.0, scale, p.shape).astype(np.float32)), params
    )


def _numpy_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _numpy_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _numpy_encoder_block(x, p):
    """Pre-norm block on tokens x [batch, N, D] with params p of one encoderblock."""
    attention = p["MultiHeadDotProductAttention_1"]
    y = _numpy_layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
    q = np.einsum("bnd,dhk->bnhk", y, attention["query"]["kernel"]) + attention["query"]["bias"]
    k = np.einsum("bnd,dhk->bnhk", y, attention["key"]["kernel"]) + attention["key"]["bias"]
    v = np.einsum("bnd,dhk->bnhk", y, attention["value"]["kernel"]) + attention["value"]["bias"]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attended = np.einsum("bhqs,bshk->bqhk", weights, v)
    out = np.einsum("bqhk,hkd->bqd", attended, attention["out"]["kernel"]) + attention["out"]["bias"]
    x = x + out

    mlp = p["MlpBlock_3"]
    y = _numpy_layer_norm(x, p["LayerNorm_2"]["scale"], p["LayerNorm_2"]["bias"])
    y = _numpy_gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


@pytest.mark.parametrize("image_size", [224, 160])
def test_vit_ti16_forward_shapes(image_size):
    model = vit.VisionTransformer("ti16", image_size=image_size, include_top=True, num_classes=10)
    images = _random_images((2, image_size, image_size, 3))
    variables = model.init(jax.random.key(0), images)

    outputs = model.apply(variables, images)

    grid = image_size // 16
    assert [m.shape for m in outputs["feature_maps"]] == [(2, grid, grid, 192)]
    assert outputs["pooled"].shape == (2, 192)
    assert outputs["logits"].shape == (2, 10)
    assert variables["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (
        1,
        grid * grid + 1,
        192,
    )


@pytest.mark.parametrize(
    "variant, width, depth",
    [("s16", 384, 12), ("b16", 768, 12), ("l16", 1024, 24)],
)
@pytest.mark.parametrize("image_size", [224, 256])
def test_vit_large_variants_shapes(variant, width, depth, image_size):
    model = vit.VisionTransformer(variant, image_size=image_size, include_top=True)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)

    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outputs = jax.eval_shape(model.apply, variables, images)

    grid = image_size // 16
    assert [m.shape for m in outputs["feature_maps"]] == [(2, grid, grid, width)]
    assert outputs["pooled"].shape == (2, width)
    assert outputs["logits"].shape == (2, 1000)
    blocks = [k for k in variables["params"]["Transformer"] if k.startswith("encoderblock_")]
    assert len(blocks) == depth


def test_patch_embedding_fast_matches_native():
    images = _random_images((2, 32, 48, 3))
    fast = vit.PatchEmbedding(24, 8, impl="fast")
    native = vit.PatchEmbedding(24, 8, impl="native")
    params = _randomize(fast.init(jax.random.key(0), images))

    fast_out = fast.apply(params, images)
    native_out = native.apply(params, images)

    assert fast_out.shape == (2, 4, 6, 24)
    np.testing.assert_allclose(np.asarray(fast_out), np.asarray(native_out), rtol=1e-5, atol=1e-5)


def test_patchify_matches_kernel_layout():
    images = _random_images((1, 4, 4, 3))
    kernel = np.random.default_rng(1).normal(size=(2, 2, 3, 5)).astype(np.float32)

    patches = np.asarray(vit.patchify(images, 2))
    expected = np.einsum("hwc,hwco->o", np.asarray(images)[0, 2:4, 0:2], kernel)

    assert patches.shape == (1, 2, 2, 12)
    np.testing.assert_allclose(patches[0, 1, 0] @ kernel.reshape(12, 5), expected, rtol=1e-5)


def test_encoder_block_matches_numpy_reference():
    block = vit.EncoderBlock(num_heads=4, mlp_dim=64)
    tokens = _random_images((2, 5, 32))
    params = _randomize(block.init(jax.random.key(0), tokens))["params"]

    output = block.apply({"params": params}, tokens)
    numpy_params = jax.tree_util.tree_map(np.asarray, params)
    expected = _numpy_encoder_block(np.asarray(tokens, np.float64), numpy_params)

    np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-4, atol=1e-4)


def test_pooled_is_class_token_output():
    model = vit.VisionTransformer("ti16", image_size=32, **TINY)
    images = _random_images((2, 32, 32, 3))
    params = _randomize(model.init(jax.random.key(0), images)["params"])

    outputs = model.apply({"params": params}, images)
    tokens = outputs["feature_maps"][0]

    assert tokens.shape == (2, 4, 4, 32)
    # The class token attends to the patches, so its output differs from their mean.
    assert not np.allclose(outputs["pooled"], tokens.mean(axis=(1, 2)), atol=1e-3)


def test_class_token_off_pools_patch_mean():
    model = vit.VisionTransformer("ti16", image_size=32, use_class_token=False, **TINY)
    images = _random_images((2, 32, 32, 3))
    params = _randomize(model.init(jax.random.key(0), images)["params"])

    outputs = model.apply({"params": params}, images)
    tokens = outputs["feature_maps"][0]

    assert "cls" not in params
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 32)
    np.testing.assert_allclose(outputs["pooled"], tokens.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
    images = _random_images((2, 32, 32, 3))
    model32 = vit.VisionTransformer("ti16", image_size=32, include_top=True, num_classes=7, **TINY)
    model16 = model32.clone(dtype=jnp.bfloat16)
    params = _randomize(model32.init(jax.random.key(0), images)["params"], scale=0.1)

    out32 = model32.apply({"params": params}, images)
    out16 = model16.apply({"params": params}, images)

    for key in ("pooled", "logits"):
        assert out16[key].dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(out16[key], np.float32), np.asarray(out32[key]), rtol=0.05, atol=0.05
        )
    assert out16["feature_maps"][0].dtype == jnp.bfloat16


def test_non_square_image_size():
    model = vit.VisionTransformer("ti16", image_size=(32, 48), **TINY)
    images = _random_images((1, 32, 48, 3))
    variables = model.init(jax.random.key(0), images)

    outputs = model.apply(variables, images)

    assert outputs["feature_maps"][0].shape == (1, 4, 6, 32)


def test_wrong_image_size_raises():
    model = vit.VisionTransformer("ti16", image_size=32, **TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    with pytest.raises(ValueError, match="image_size"):
        model.apply(variables, jnp.zeros((1, 40, 40, 3)))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit.grid_shape(100, 16)
    with pytest.raises(ValueError, match="variant"):
        vit.VisionTransformer("h14").init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    model = vit.VisionTransformer("ti16", image_size=32, **TINY)
    with pytest.raises(ValueError, match="float images"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))


def test_param_names_follow_release_layout():
    model = vit.VisionTransformer("ti16", image_size=32, include_top=True, **TINY)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")

    assert flat["embedding/kernel"].shape == (8, 8, 3, 32)
    assert flat["cls"].shape == (1, 1, 32)
    assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
    attention = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    assert flat[f"{attention}/query/kernel"].shape == (32, 4, 8)
    assert flat[f"{attention}/out/kernel"].shape == (4, 8, 32)
    assert flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape == (32, 64)
    assert flat["Transformer/encoder_norm/scale"].shape == (32,)
    assert flat["head/kernel"].shape == (32, 1000)
