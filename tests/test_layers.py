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
    # Over 32 x 32 output pixels at stride 2: the kernel gradient uses separate sums per tap.
    ("depthwise3_stride2_large", (2, 66, 66, 4), 4, 3, 2, 4, "SAME"),
    ("regular3_stride2", (2, 12, 12, 3), 16, 3, 2, 1, "TF_SAME"),
    ("regular3_int_padding", (2, 12, 12, 3), 16, 3, 2, 1, 1),
    ("grouped3", (2, 8, 8, 12), 6, 3, 1, 3, "SAME"),
]


@jax.jit(static_argnums=(3, 4, 5))
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


def _hashable(padding):
    if isinstance(padding, (str, int)):
        return padding
    return tuple(tuple(pair) for pair in padding)


def _modules(case, dtype):
    _, _, features, kernel, strides, groups, padding = case
    return {
        impl: Conv(
            features,
            kernel_size=(kernel, kernel),
            strides=(strides, strides),
            padding=padding,
            feature_group_count=groups,
            dtype=dtype,
            impl=impl,
            bias_init=nn.initializers.normal(0.5),
        )
        for impl in ("native", "fast")
    }


def _inputs(case):
    shape = case[1]
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
    variables = jax.jit(_modules(case, jnp.float32)["native"].init)(jax.random.key(0), x)
    return variables, x


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_conv_impls_match_lax(case):
    _, _, _, _, strides, groups, padding = case
    variables, x = _inputs(case)
    f32 = _modules(case, jnp.float32)
    bf16 = _modules(case, jnp.bfloat16)

    # One jit per case keeps the number of XLA compilations (the bulk of the run time) small.
    @jax.jit
    def run(variables, x):
        params = variables["params"]
        rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
        x_rounded = x.astype(jnp.bfloat16).astype(jnp.float32)
        return {
            "want_f32": _reference(
                x, params["kernel"], params["bias"], strides, groups, _hashable(padding)
            ),
            "want_bf16": _reference(
                x_rounded, rounded["kernel"], rounded["bias"], strides, groups, _hashable(padding)
            ),
            **{f"{impl}_f32": m.apply(variables, x) for impl, m in f32.items()},
            **{
                f"{impl}_bf16": m.apply(variables, x.astype(jnp.bfloat16))
                for impl, m in bf16.items()
            },
        }

    out = run(variables, x)
    scale = float(jnp.max(jnp.abs(out["want_bf16"])))

    for impl in ("native", "fast"):
        got_f32 = out[f"{impl}_f32"]
        got_bf16 = out[f"{impl}_bf16"]
        assert got_f32.shape == out["want_f32"].shape, impl
        assert got_f32.dtype == jnp.float32, impl
        assert got_bf16.dtype == jnp.bfloat16, impl
        np.testing.assert_allclose(
            np.asarray(got_f32), np.asarray(out["want_f32"]), rtol=1e-5, atol=1e-5,
            err_msg=f"{impl} float32",
        )
        np.testing.assert_allclose(
            np.asarray(got_bf16, np.float32), np.asarray(out["want_bf16"]), rtol=0,
            atol=0.02 * scale, err_msg=f"{impl} bfloat16",
        )


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_conv_gradients_agree(case):
    variables, x = _inputs(case)
    modules = _modules(case, jnp.float32)
    out_shape = jax.eval_shape(modules["native"].apply, variables, x).shape
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(out_shape, np.float32))

    @jax.jit
    def grads(variables, x):
        def loss(module, variables, x):
            return jnp.sum(module.apply(variables, x) * cotangent)

        return {
            impl: jax.grad(lambda v, x: loss(m, v, x), argnums=(0, 1))(variables, x)
            for impl, m in modules.items()
        }

    out = grads(variables, x)

    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            np.asarray(out["fast"][0]["params"][name]),
            np.asarray(out["native"][0]["params"][name]),
            rtol=1e-4,
            atol=1e-4,
            err_msg=f"gradient of {name}",
        )
    np.testing.assert_allclose(
        np.asarray(out["fast"][1]), np.asarray(out["native"][1]), rtol=1e-4, atol=1e-4,
        err_msg="gradient of the input",
    )


@pytest.mark.parametrize("kind", ["pointwise", "depthwise"])
def test_fast_gradients_in_bfloat16_follow_float32(kind):
    # The custom backward passes accumulate in float32 and return gradients in the compute dtype.
    features, kernel, groups = (24, 1, 1) if kind == "pointwise" else (12, 3, 12)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 9, 9, 12), np.float32))
    modules = {
        name: Conv(features, (kernel, kernel), feature_group_count=groups, dtype=name, impl="fast")
        for name in ("float32", "bfloat16")
    }
    variables = jax.jit(modules["float32"].init)(jax.random.key(0), x)

    @jax.jit
    def grads(variables, x):
        return {
            name: jax.grad(
                lambda v, x, m=m, name=name: jnp.sum(
                    jnp.square(m.apply(v, x.astype(name)).astype(jnp.float32))
                ),
                argnums=(0, 1),
            )(variables, x)
            for name, m in modules.items()
        }

    out = grads(variables, x)

    want_kernel = np.asarray(out["float32"][0]["params"]["kernel"])
    got_kernel = out["bfloat16"][0]["params"]["kernel"]
    assert got_kernel.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got_kernel), want_kernel, rtol=0, atol=0.03 * np.abs(want_kernel).max()
    )
    want_x = np.asarray(out["float32"][1])
    np.testing.assert_allclose(
        np.asarray(out["bfloat16"][1], np.float32), want_x, rtol=0, atol=0.03 * np.abs(want_x).max()
    )


def test_conv_params_match_flax_conv():
    x = jnp.ones((1, 8, 8, 6))
    ours = jax.eval_shape(
        Conv(12, kernel_size=(3, 3), feature_group_count=3).init, jax.random.key(0), x
    )
    theirs = jax.eval_shape(
        nn.Conv(12, kernel_size=(3, 3), feature_group_count=3).init, jax.random.key(0), x
    )

    ours_shapes = jax.tree.map(jnp.shape, ours)
    theirs_shapes = jax.tree.map(jnp.shape, theirs)

    assert ours_shapes == theirs_shapes


def test_conv_same_matches_flax_conv_output():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 10, 10, 4), np.float32))
    flax_conv = nn.Conv(8, kernel_size=(3, 3), strides=(2, 2), padding="SAME")
    variables = jax.jit(flax_conv.init)(jax.random.key(0), x)

    @jax.jit
    def run(variables, x):
        outputs = {"flax": flax_conv.apply(variables, x)}
        for impl in ("native", "fast"):
            ours = Conv(8, kernel_size=(3, 3), strides=(2, 2), padding="SAME", impl=impl)
            outputs[impl] = ours.apply(variables, x)
        return outputs

    out = run(variables, x)

    for impl in ("native", "fast"):
        np.testing.assert_allclose(
            np.asarray(out[impl]), np.asarray(out["flax"]), rtol=1e-5, atol=1e-5, err_msg=impl
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
        variables = jax.eval_shape(module.init, jax.random.key(0), x)
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
        jax.eval_shape(Conv(4, kernel_size=3, impl="cudnn").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="padding"):
        jax.eval_shape(Conv(4, kernel_size=3, padding="FULL").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="batch, H, W, C"):
        jax.eval_shape(Conv(4, kernel_size=3).init, jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="feature_group_count"):
        jax.eval_shape(Conv(4, kernel_size=3, feature_group_count=4).init, jax.random.key(0), x)


def test_dense_matches_flax_dense():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 7), np.float32))
    theirs = nn.Dense(11)
    variables = jax.jit(theirs.init)(jax.random.key(0), x)

    got, want = jax.jit(lambda v, x: (Dense(11).apply(v, x), theirs.apply(v, x)))(variables, x)

    assert got.shape == (3, 5, 11)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
