"""Convolution and dense layers with a CPU-fast formulation.

XLA's CPU backend runs grouped (depthwise) and 1x1 convolutions far below the speed of the same
arithmetic written as elementwise multiply-adds or as a matrix product. `Conv` keeps the parameter
names and shapes of `flax.linen.Conv` (`kernel` [kh, kw, in / groups, out], `bias` [out]) and
chooses at trace time between two formulations:

- "native": `lax.conv_general_dilated`, used for every convolution on GPU and TPU;
- "fast": a 1x1 convolution (strided or not) as a matrix product over the channel axis, and a
  depthwise k x k convolution (feature_group_count == in == out) as a sum of k*k shifted
  multiply-adds over the padded input. Any other convolution falls back to "native".

`impl="auto"` picks "fast" when `jax.default_backend()` is "cpu" and "native" otherwise. The
context manager `conv_impl_override` replaces the choice of every `Conv` built with
`impl="auto"`, for example to benchmark one formulation against the other.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

IMPLS = ("auto", "native", "fast")

PaddingLike = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]

_IMPL_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aqhash_conv_impl_override", default=None
)

default_kernel_init = nn.initializers.lecun_normal()


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is invalid; use one of {IMPLS}.")


@contextlib.contextmanager
def conv_impl_override(impl: str) -> Iterator[None]:
    """Make every `Conv` built with impl="auto" use `impl` while tracing inside this block.

    The choice is made when a function is traced, so a function that `jax.jit` already compiled
    outside the block keeps its formulation. Trace it again (a new jit) to see the override.
    """
    _check_impl(impl)
    token = _IMPL_OVERRIDE.set(impl)
    try:
        yield
    finally:
        _IMPL_OVERRIDE.reset(token)


def resolve_conv_impl(impl: str) -> str:
    """Return "native" or "fast" for `impl` on the current default backend.

    "auto" first honours `conv_impl_override`, then picks "fast" on the CPU backend and "native"
    on every other backend.
    """
    _check_impl(impl)
    if impl == "auto":
        override = _IMPL_OVERRIDE.get()
        if override is not None and override != "auto":
            return override
        return "fast" if jax.default_backend() == "cpu" else "native"
    return impl


def _as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name}={value!r} is invalid; give an int or a pair of ints.")
    return pair  # type: ignore[return-value]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Return (low, high) padding of TensorFlow "SAME": output ceil(size / stride), extra row high.

    This is also the rule of `lax.conv_general_dilated(padding="SAME")`.
    """
    output = -(-size // stride)
    total = max((output - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


def resolve_padding(
    padding: PaddingLike,
    spatial_shape: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Turn a padding spec into explicit ((top, bottom), (left, right)) pixel counts.

    "SAME" and "TF_SAME" both follow TensorFlow's rule, which puts the odd pixel at the
    bottom/right as `lax.conv_general_dilated` does. "TF_SAME" only names that rule for code
    ported from TensorFlow. "VALID" pads nothing. An int pads all sides equally, a pair of ints pads (rows,
    columns) symmetrically, and a pair of pairs gives each side explicitly.
    """
    if isinstance(padding, str):
        name = padding.upper()
        if name in ("SAME", "TF_SAME"):
            return tuple(  # type: ignore[return-value]
                same_padding(n, k, s) for n, k, s in zip(spatial_shape, kernel_size, strides)
            )
        if name == "VALID":
            return ((0, 0), (0, 0))
        raise ValueError(
            f"padding={padding!r} is invalid; use 'SAME', 'TF_SAME', 'VALID', an int or pairs."
        )

    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))

    items = list(padding)
    if len(items) != 2:
        raise ValueError(f"padding={padding!r} is invalid; give one entry per spatial axis (2).")
    if all(isinstance(item, int) for item in items):
        return ((items[0], items[0]), (items[1], items[1]))  # type: ignore[return-value]
    pairs = tuple(_as_pair(item, "padding entry") for item in items)  # type: ignore[arg-type]
    return pairs  # type: ignore[return-value]


def _output_size(size: int, pad: tuple[int, int], kernel: int, stride: int) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def conv_native(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    feature_group_count: int,
    precision: Any = None,
) -> jax.Array:
    """Convolve NHWC `x` with HWIO `kernel` through `lax.conv_general_dilated`."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=feature_group_count,
        precision=precision,
    )


def conv_pointwise(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """Compute a 1x1 convolution as a matrix product over the channel axis.

    x: [batch, H, W, C_in]; kernel: [1, 1, C_in, C_out]. A stride keeps every s-th pixel, which
    is exactly what a 1x1 window does. The kernel gradient is summed image by image.
    """
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    if strides != (1, 1):
        x = x[:, :: strides[0], :: strides[1], :]
    return _channel_matmul(x, kernel[0, 0], precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _channel_matmul(x: jax.Array, weight: jax.Array, precision: Any) -> jax.Array:
    """Multiply x [batch, H, W, C_in] by weight [C_in, C_out] over the channel axis.

    The weight gradient is accumulated image by image (see `_channel_matmul_bwd`).
    """
    return jnp.dot(x, weight, precision=precision)


def _channel_matmul_fwd(x, weight, precision):
    return jnp.dot(x, weight, precision=precision), (x, weight)


def _channel_matmul_bwd(precision, residuals, grad_out):
    """Return (d loss / d x, d loss / d weight) of `_channel_matmul`.

    Autodiff gives the weight gradient as one matrix product contracting batch and pixels, and
    XLA's CPU backend then copies the [batch * H * W, C_out] output gradient into channel-major
    order first: the largest single op of a training step. A `lax.scan` over images sums
    x_n^T g_n instead, so the operands keep their stored layout and stay in cache. One
    EfficientNet-Lite0 gradient step at batch 32 ran 18% and 48% faster this way in two runs.
    """
    x, weight = residuals
    grad_x = jnp.dot(grad_out, weight.T, precision=precision).astype(x.dtype)
    accumulate_dtype = jnp.promote_types(weight.dtype, jnp.float32)

    def add_image(total, image_and_grad):
        image, grad = image_and_grad
        image = image.reshape(-1, image.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        product = jnp.dot(image.T, grad, precision=precision, preferred_element_type=accumulate_dtype)
        return total + product, None

    grad_weight, _ = lax.scan(
        add_image, jnp.zeros(weight.shape, accumulate_dtype), (x, grad_out)
    )
    return grad_x, grad_weight.astype(weight.dtype)


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _depthwise_taps(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """Sum kh*kw shifted multiply-adds; the forward formulation behind `conv_depthwise`."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    batch, height, width, channels = x.shape
    out_h = _output_size(height, pads[0], kh, strides[0])
    out_w = _output_size(width, pads[1], kw, strides[1])

    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    accumulate_dtype = jnp.promote_types(x.dtype, jnp.float32)
    weights = kernel[:, :, 0, :].astype(accumulate_dtype)

    total = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                x,
                (0, i, j, 0),
                (batch, i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1, channels),
                (1, strides[0], strides[1], 1),
            )
            term = window.astype(accumulate_dtype) * weights[i, j]
            total = term if total is None else total + term
    return total.astype(x.dtype)


# Largest output (pixels per image) of a strided depthwise layer whose kernel gradient is one
# variadic reduction (see `_depthwise_kernel_grad`).
_VARIADIC_STRIDED_MAX_PIXELS = 32 * 32


def _depthwise_kernel_grad(
    x: jax.Array,
    grad_out: jax.Array,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """Compute d loss / d kernel [kh, kw, 1, C] of a depthwise convolution, one image at a time.

    Each tap needs sum over (batch, H, W) of window * grad_out. XLA's CPU backend reduces over
    the leading axes of a whole batch several times slower than over one image's cache-sized
    block, so a `lax.scan` over the batch accumulates the per-image sums.

    The kh*kw sums are one variadic reduction. XLA then reads each window straight from the
    padded image inside one reduction loop, where separate sums would first copy every window
    out. On a 2-core CPU this cut the kernel gradient's time of most EfficientNet layers by up to
    half, and no layer got slower. Strided layers with large outputs (block 1 of EfficientNet:
    56 x 56 from 112 x 112) measured about 15% faster with separate sums, so they keep them.
    """
    kh, kw = kernel_shape[0], kernel_shape[1]
    out_h, out_w, channels = grad_out.shape[1:]
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    accumulate_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def add_image(total, image_and_grad):
        image, grad = image_and_grad
        grad = grad.astype(accumulate_dtype)
        products = []
        for i in range(kh):
            for j in range(kw):
                window = lax.slice(
                    image,
                    (i, j, 0),
                    (i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1, channels),
                    (strides[0], strides[1], 1),
                )
                products.append(window.astype(accumulate_dtype) * grad)
        if strides == (1, 1) or out_h * out_w <= _VARIADIC_STRIDED_MAX_PIXELS:
            zeros = tuple(jnp.zeros((), accumulate_dtype) for _ in products)
            taps = lax.reduce(
                tuple(products),
                zeros,
                lambda left, right: tuple(a + b for a, b in zip(left, right)),
                (0, 1),
            )
        else:
            taps = [jnp.sum(product, axis=(0, 1)) for product in products]
        return total + jnp.stack(taps), None

    total, _ = lax.scan(add_image, jnp.zeros((kh * kw, channels), accumulate_dtype), (x, grad_out))
    return total.reshape(kh, kw, 1, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_depthwise(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """Compute a depthwise convolution as a sum of kh*kw shifted multiply-adds.

    x: [batch, H, W, C]; kernel: [kh, kw, 1, C]. Each tap (i, j) multiplies the strided window
    of the padded input that starts at (i, j) by one weight per channel. Products are summed in
    float32 (or the wider input dtype) and cast back to the dtype of `x`. The input gradient is
    the autodiff of these taps, and the kernel gradient is accumulated image by image (see
    `_depthwise_kernel_grad`).
    """
    return _depthwise_taps(x, kernel, strides, pads)


def _conv_depthwise_fwd(x, kernel, strides, pads):
    return _depthwise_taps(x, kernel, strides, pads), (x, kernel)


def _conv_depthwise_bwd(strides, pads, residuals, grad_out):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _depthwise_taps(x, kernel, strides, pads), x)
    (grad_x,) = input_vjp(grad_out)
    grad_kernel = _depthwise_kernel_grad(x, grad_out, kernel.shape, strides, pads)
    return grad_x, grad_kernel.astype(kernel.dtype)


conv_depthwise.defvjp(_conv_depthwise_fwd, _conv_depthwise_bwd)


class Conv(nn.Module):
    """2-D convolution on NHWC inputs with the parameters of `flax.linen.Conv`.

    Attributes:
      features: number of output channels.
      kernel_size: (kh, kw) or one int for both.
      strides: (sh, sw) or one int for both.
      padding: "SAME", "TF_SAME" (both TensorFlow's rule), "VALID", an int, a pair of ints or a
        pair of (low, high) pairs.
      feature_group_count: number of channel groups; equal to the input and output channel count
        for a depthwise convolution.
      use_bias: whether to add a learned bias.
      dtype: computation dtype; None promotes the input and parameter dtypes.
      param_dtype: dtype of `kernel` and `bias`.
      impl: "auto", "native" or "fast" (see the module docstring).
      precision: passed to `lax.conv_general_dilated` and `jnp.dot`.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    precision: Any = None
    kernel_init: Callable[..., jax.Array] = default_kernel_init
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Convolve inputs float [batch, H, W, C_in] to [batch, H_out, W_out, features]."""
        if inputs.ndim != 4:
            raise ValueError(
                f"Conv expects inputs of shape [batch, H, W, C]; got shape {inputs.shape}. "
                "Add a batch axis with x[None] for a single image."
            )
        kernel_size = _as_pair(self.kernel_size, "kernel_size")
        strides = _as_pair(self.strides, "strides")
        in_features = inputs.shape[-1]
        groups = self.feature_group_count
        if in_features % groups or self.features % groups:
            raise ValueError(
                f"feature_group_count={groups} must divide the input channels ({in_features}) "
                f"and features ({self.features})."
            )

        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, in_features // groups, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        pads = resolve_padding(self.padding, inputs.shape[1:3], kernel_size, strides)
        impl = resolve_conv_impl(self.impl)
        is_pointwise = kernel_size == (1, 1) and groups == 1
        is_depthwise = groups == in_features == self.features and groups > 1

        if impl == "fast" and is_pointwise:
            y = conv_pointwise(inputs, kernel, strides, pads, self.precision)
        elif impl == "fast" and is_depthwise:
            y = conv_depthwise(inputs, kernel, strides, tuple(map(tuple, pads)))
        else:
            y = conv_native(inputs, kernel, strides, pads, groups, self.precision)

        if bias is not None:
            y = y + bias
        return y


class Dense(nn.Module):
    """Fully connected layer with the parameters of `flax.linen.Dense` (`kernel` [in, out], `bias`).

    Attributes:
      features: number of output features.
      use_bias: whether to add a learned bias.
      dtype: computation dtype; None promotes the input and parameter dtypes.
      param_dtype: dtype of `kernel` and `bias`.
      precision: passed to `jnp.dot`.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable[..., jax.Array] = default_kernel_init
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Map inputs float [..., in] to [..., features]."""
        if inputs.ndim < 1:
            raise ValueError("Dense expects inputs with a feature axis; got a scalar.")
        kernel = self.param(
            "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jnp.dot(inputs, kernel, precision=self.precision)
        if bias is not None:
            y = y + bias
        return y


def conv_flops(kernel_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """Count the FLOPs (2 per multiply-add) of one convolution, bias excluded.

    kernel_shape is HWIO (I = input channels per group) and output_shape is NHWC.
    """
    batch, out_h, out_w, out_c = output_shape
    kh, kw, in_per_group, _ = kernel_shape
    return 2 * batch * out_h * out_w * out_c * kh * kw * in_per_group


__all__ = [
    "IMPLS",
    "Conv",
    "Dense",
    "conv_depthwise",
    "conv_flops",
    "conv_impl_override",
    "conv_native",
    "conv_pointwise",
    "resolve_conv_impl",
    "resolve_padding",
    "same_padding",
]
