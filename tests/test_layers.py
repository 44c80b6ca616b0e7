"""Tests for the native and fast convolution formulations in aqhash_jax.models.layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from aqhash_jax.models import layers
from aqhash_jax.models.layers import Conv, Dense

# (name, input shape NHWC, features, kernel, strides, groups, padding)
CASES = [
    ("pointwise", (2, 9, 11, 16), 24, 1, 1, 1, "SAME"),
    ("pointwise_stride2", (2, 9, 10, 16), 8, 1, 2, 1, "SAME"),
    ("pointwise_stride2_valid", (2, 9, 10, 16), 8, 1, 2, 1, "VALID"),
    ("depthwise3_stride1", (2, 10, 9, 12), 12, 3, 1, 12, "SAME"),
    ("depthwise3_stride2_even", (2, 10, 12, 12), 12, 3, 2, 12, "TF_SAME"),
    ("depthwise3_stride2_odd", (2, 11, 9, 12), 12, 3, 2, 12, "SAME"),
    ("depthwise5_stride1", (2, 10, 9, 12), 12, 5, 1, 12, "TF_SAME"),
    ("depthwise5_stride2", (2, 14, 14, 12), 12, 5, 2, 12, "SAME"),
    ("depthwise3_explicit", (2, 8, 8, 12), 12, 3, 2, 12, ((1, 1), (0, 2))),
    ("depthwise3_valid", (2, 8, 8, 12), 12, 3, 1, 12, "VALID"),
    ("regular3_stride2", (2, 12, 12, 3), 16, 3, 2, 1, "TF_SAME"),
    ("regular3_int_padding", (2, 12, 12, 3), 16, 3, 2, 1, 1),
    ("grouped3", (2, 8, 8, 12), 6, 3, 1, 3, "SAME"),
]


def _reference(x, kernel, bias, strides, groups, padding):
    """Compute the convolution directly with lax, padding resolved the way the layer documents."""
    if isinstance(padding, str) and padding.upper() == "TF_SAME":
        padding = "SAME"
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )
    return y + bias


def _build(case, impl, dtype):
    _, shape, features, kernel, strides, groups, padding = case
    module = Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        feature_group_count=groups,
        dtype=dtype,
        impl=impl,
        bias_init=nn.initializers.normal(0.5),
    )
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    variables = module.init(jax.random.key(0), x)
    return module, variables, x


@pytest.mark.parametrize("impl", ["native", "fast"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_conv_matches_lax_float32(case, impl):
    module, variables, x = _build(case, impl, jnp.float32)
    _, _, _, _, strides, groups, padding = case
    params = variables["params"]

    got = module.apply(variables, x)
    want = _reference(x, params["kernel"], params["bias"], strides, groups, padding)

    assert got.shape == want.shape
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["native", "fast"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_conv_matches_lax_bfloat16(case, impl):
    module, variables, x = _build(case, impl, jnp.bfloat16)
    _, _, _, _, strides, groups, padding = case
    params = variables["params"]

    got = module.apply(variables, x)
    kernel = params["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
    bias = params["bias"].astype(jnp.bfloat16).astype(jnp.float32)
    want = _reference(x.astype(jnp.float32), kernel, bias, strides, groups, padding)

    assert got.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want), rtol=0, atol=0.02 * scale
    )


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_conv_gradients_agree(case):
    _, shape, features, kernel, strides, groups, padding = case
    native, variables, x = _build(case, "native", jnp.float32)
    fast, _, _ = _build(case, "fast", jnp.float32)
    out_shape = jax.eval_shape(native.apply, variables, x).shape
    cotangent = jax.random.normal(jax.random.key(2), out_shape)

    def loss(module, variables, x):
        return jnp.sum(module.apply(variables, x) * cotangent)

    grad_native = jax.grad(lambda v, x: loss(native, v, x), argnums=(0, 1))(variables, x)
    grad_fast = jax.grad(lambda v, x: loss(fast, v, x), argnums=(0, 1))(variables, x)

    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            np.asarray(grad_fast[0]["params"][name]),
            np.asarray(grad_native[0]["params"][name]),
            rtol=1e-4,
            atol=1e-4,
            err_msg=f"gradient of {name}",
        )
    np.testing.assert_allclose(
        np.asarray(grad_fast[1]), np.asarray(grad_native[1]), rtol=1e-4, atol=1e-4
    )


def test_conv_params_match_flax_conv():
    x = jnp.ones((1, 8, 8, 6))
    ours = Conv(12, kernel_size=(3, 3), feature_group_count=3).init(jax.random.key(0), x)
    theirs = nn.Conv(12, kernel_size=(3, 3), feature_group_count=3).init(jax.random.key(0), x)

    ours_shapes = jax.tree.map(jnp.shape, ours)
    theirs_shapes = jax.tree.map(jnp.shape, theirs)

    assert ours_shapes == theirs_shapes


def test_conv_same_matches_flax_conv_output():
    x = jax.random.normal(jax.random.key(3), (2, 10, 10, 4))
    flax_conv = nn.Conv(8, kernel_size=(3, 3), strides=(2, 2), padding="SAME")
    variables = flax_conv.init(jax.random.key(0), x)

    for impl in ("native", "fast"):
        ours = Conv(8, kernel_size=(3, 3), strides=(2, 2), padding="SAME", impl=impl)
        np.testing.assert_allclose(
            np.asarray(ours.apply(variables, x)),
            np.asarray(flax_conv.apply(variables, x)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_tf_same_pads_bottom_right():
    assert layers.same_padding(224, 3, 2) == (0, 1)
    assert layers.same_padding(224, 5, 2) == (1, 2)
    assert layers.same_padding(225, 3, 2) == (1, 1)
    assert layers.same_padding(14, 5, 1) == (2, 2)


def test_fast_impl_avoids_conv_op():
    x = jnp.ones((1, 8, 8, 12))
    for kernel, groups in ((1, 1), (3, 12)):
        module = Conv(12, kernel_size=kernel, feature_group_count=groups, impl="fast")
        variables = module.init(jax.random.key(0), x)
        text = jax.jit(module.apply).lower(variables, x).as_text()
        assert "convolution" not in text, f"kernel {kernel}, groups {groups}"


def test_auto_impl_follows_backend_and_override():
    expected = "fast" if jax.default_backend() == "cpu" else "native"
    assert layers.resolve_conv_impl("auto") == expected

    with layers.conv_impl_override("native"):
        assert layers.resolve_conv_impl("auto") == "native"
        assert layers.resolve_conv_impl("fast") == "fast"

    assert layers.resolve_conv_impl("auto") == expected


def test_conv_rejects_bad_arguments():
    x = jnp.ones((1, 8, 8, 6))
    with pytest.raises(ValueError, match="impl"):
        Conv(4, kernel_size=3, impl="cudnn").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="padding"):
        Conv(4, kernel_size=3, padding="FULL").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="batch, H, W, C"):
        Conv(4, kernel_size=3).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="feature_group_count"):
        Conv(4, kernel_size=3, feature_group_count=4).init(jax.random.key(0), x)


def test_dense_matches_flax_dense():
    x = jax.random.normal(jax.random.key(4), (3, 5, 7))
    theirs = nn.Dense(11)
    variables = theirs.init(jax.random.key(0), x)

    got = Dense(11).apply(variables, x)

    np.testing.assert_allclose(
        np.asarray(got), np.asarray(theirs.apply(variables, x)), rtol=1e-6, atol=1e-6
    )
