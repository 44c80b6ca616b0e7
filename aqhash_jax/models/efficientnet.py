"""EfficientNet-Lite0 ... Lite4 backbones (Tan and Le, EfficientNet, ICML 2019; Lite variants from
the TensorFlow TPU model garden).

The Lite variants differ from EfficientNet-B*: no squeeze-and-excitation, ReLU6 activations, and
a stem (32 channels), head (1280 channels) and first and last stage depths that do not scale
with the width and depth multipliers. All convolutions use TensorFlow "SAME" padding, which pads
the extra row and column at the bottom and right when a stride-2 window does not fit evenly.
Batch norm uses epsilon 1e-3 and momentum 0.99 (running = 0.99 * running + 0.01 * batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aqhash_jax.models.layers import Conv, Dense

# (width multiplier, depth multiplier, input resolution, classifier dropout rate)
VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

STEM_FEATURES = 32
HEAD_FEATURES = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of inverted-residual (MBConv) blocks, before width and depth scaling."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    features: int


BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)

# Index in BASE_STAGES of the last stage at stride 16, whose output is the first feature map.
STRIDE16_STAGE = 4


def round_features(features: int, width_multiplier: float, divisor: int = 8) -> int:
    """Scale a channel count and round it to a multiple of `divisor`, never dropping below 90%."""
    scaled = features * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth_multiplier: float) -> int:
    """Scale a stage depth, rounding up."""
    return int(math.ceil(depth_multiplier * repeats))


def _split_variant(variant: str) -> str:
    key = variant.lower().removeprefix("efficientnet_").removeprefix("efficientnet-")
    if key not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is invalid; use one of {sorted(VARIANTS)} "
            "(optionally prefixed with 'efficientnet_')."
        )
    return key


def stage_layout(variant: str) -> list[StageSpec]:
    """Return the stages of a variant with width and depth scaling applied.

    The first and last stages keep their depth, as in the Lite models.
    """
    width, depth, _, _ = VARIANTS[_split_variant(variant)]
    stages = []
    for index, spec in enumerate(BASE_STAGES):
        fixed_depth = index in (0, len(BASE_STAGES) - 1)
        repeats = spec.repeats if fixed_depth else round_repeats(spec.repeats, depth)
        stages.append(
            dataclasses.replace(
                spec, repeats=repeats, features=round_features(spec.features, width)
            )
        )
    return stages


def default_resolution(variant: str) -> int:
    """Return the training and evaluation input size (pixels per side) of a variant."""
    return VARIANTS[_split_variant(variant)][2]


def input_normalization(name: str = "efficientnet_lite0") -> tuple[float, float]:
    """Return (mean, std) that map pixel values in [0, 255] to the backbone input, x = (p - mean) / std.

    The result, p / 127.5 - 1 in [-1, 1], is the normalisation timm (0.9) uses for its
    tf_efficientnet_lite models (mean 0.5, std 0.5 on [0, 1] inputs). The TensorFlow reference
    preprocessing uses mean 127 and std 128, which differs by under 0.5% per pixel.
    """
    _split_variant(name)
    return (127.5, 127.5)


_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


class MBConvBlock(nn.Module):
    """Inverted-residual block without squeeze-and-excitation: expand 1x1, depthwise k x k, project 1x1.

    The shortcut is added when the stride is 1 and the channel count is unchanged.
    """

    features: int
    kernel_size: int
    stride: int
    expand_ratio: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        hidden = in_features * self.expand_ratio
        conv = dict(use_bias=False, dtype=self.dtype, impl=self.conv_impl, kernel_init=_CONV_INIT)

        y = x
        if self.expand_ratio != 1:
            y = Conv(hidden, (1, 1), name="expand_conv", **conv)(y)
            y = _batch_norm(train, self.dtype, "expand_bn")(y)
            y = jax.nn.relu6(y)

        y = Conv(
            hidden,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding="TF_SAME",
            feature_group_count=hidden,
            name="depthwise_conv",
            **conv,
        )(y)
        y = _batch_norm(train, self.dtype, "depthwise_bn")(y)
        y = jax.nn.relu6(y)

        y = Conv(self.features, (1, 1), name="project_conv", **conv)(y)
        y = _batch_norm(train, self.dtype, "project_bn")(y)

        if self.stride == 1 and in_features == self.features:
            if train and self.drop_path_rate > 0:
                y = _drop_path(self, y, self.drop_path_rate)
            y = y + x
        return y


def _drop_path(module: nn.Module, y: jax.Array, rate: float) -> jax.Array:
    """Zero the residual branch of whole examples with probability `rate` (stochastic depth)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone.

    Attributes:
      variant: "lite0" ... "lite4" (an "efficientnet_" prefix is accepted).
      include_top: add the 1000-way ImageNet classifier and return "logits".
      num_classes: classifier width when include_top.
      dtype: computation dtype; parameters stay float32.
      conv_impl: "auto", "native" or "fast", passed to every convolution (see layers.Conv).
      drop_path_rate: stochastic depth rate of the last block (linearly smaller for earlier
        blocks); needs a "dropout" RNG when > 0 and train=True.
      dropout_rate: dropout before the classifier, None for the variant's rate (0.2 to 0.3);
        needs a "dropout" RNG when include_top and train=True.
    """

    variant: str = "lite0"
    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    drop_path_rate: float = 0.0
    dropout_rate: float | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, Any]:
        """Run the backbone on images float [batch, H, W, 3] normalised by `input_normalization`.

        Returns a dict with "feature_maps" (the outputs at stride 16, [batch, H/16, W/16, C16],
        and stride 32 after the 1280-channel head, [batch, H/32, W/32, 1280]), "pooled" float
        [batch, 1280] and, when include_top, "logits" float [batch, num_classes]. Sizes H/16 and
        H/32 round up.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must have shape [batch, H, W, 3]; got {images.shape}. "
                "Add a batch axis with images[None] for a single image."
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"images must be floating point normalised with input_normalization; got dtype "
                f"{images.dtype}. Convert with (images - mean) / std first."
            )

        stages = stage_layout(self.variant)
        conv = dict(use_bias=False, dtype=self.dtype, impl=self.conv_impl, kernel_init=_CONV_INIT)
        x = images.astype(self.dtype)

        x = Conv(STEM_FEATURES, (3, 3), strides=(2, 2), padding="TF_SAME", name="stem_conv", **conv)(x)
        x = _batch_norm(train, self.dtype, "stem_bn")(x)
        x = jax.nn.relu6(x)

        total_blocks = sum(stage.repeats for stage in stages)
        block_index = 0
        feature_maps = []
        for stage_index, stage in enumerate(stages):
            for repeat in range(stage.repeats):
                x = MBConvBlock(
                    features=stage.features,
                    kernel_size=stage.kernel_size,
                    stride=stage.stride if repeat == 0 else 1,
                    expand_ratio=stage.expand_ratio,
                    drop_path_rate=self.drop_path_rate * block_index / total_blocks,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"blocks_{block_index}",
                )(x, train)
                block_index += 1
            if stage_index == STRIDE16_STAGE:
                feature_maps.append(x)

        x = Conv(HEAD_FEATURES, (1, 1), name="head_conv", **conv)(x)
        x = _batch_norm(train, self.dtype, "head_bn")(x)
        x = jax.nn.relu6(x)
        feature_maps.append(x)

        pooled = jnp.mean(x, axis=(1, 2))
        outputs: dict[str, Any] = {"feature_maps": feature_maps, "pooled": pooled}

        if self.include_top:
            rate = VARIANTS[_split_variant(self.variant)][3]
            rate = rate if self.dropout_rate is None else self.dropout_rate
            y = nn.Dropout(rate, deterministic=not train)(pooled)
            outputs["logits"] = Dense(
                self.num_classes, dtype=self.dtype, kernel_init=_DENSE_INIT, name="classifier"
            )(y)
        return outputs


def create_efficientnet_lite(
    name: str = "efficientnet_lite0",
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    include_top: bool = False,
    **kwargs: Any,
) -> EfficientNetLite:
    """Build `EfficientNetLite` from a registry name such as "efficientnet_lite0"."""
    return EfficientNetLite(
        variant=_split_variant(name),
        include_top=include_top,
        dtype=dtype,
        conv_impl=conv_impl,
        **kwargs,
    )


__all__ = [
    "BASE_STAGES",
    "EfficientNetLite",
    "MBConvBlock",
    "StageSpec",
    "VARIANTS",
    "create_efficientnet_lite",
    "default_resolution",
    "input_normalization",
    "round_features",
    "round_repeats",
    "stage_layout",
]
