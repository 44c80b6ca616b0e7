"""ResNet-50 in the torchvision v1.5 layout, returning its stride-16 and stride-32 stages.

The layout follows torchvision's `resnet50` (He et al., "Deep Residual Learning for Image
Recognition", 2016). As in torchvision's "v1.5" variant, each downsampling bottleneck has its
stride on the 3x3 convolution. The stem is a 7x7/2 convolution, batch norm, ReLU and 3x3/2 max
pooling. Four stages follow, of 3, 4, 6 and 3 bottleneck blocks of widths 64, 128, 256 and 512
(outputs 4x wider).
Batch norm uses epsilon 1e-5 and keeps running averages with momentum 0.9 (torchvision's 0.1
update weight).

Submodule names mirror torchvision's state-dict keys (`conv1`, `bn1`, `layer3_5`, `downsample_conv`,
`fc`, ...) so the checkpoint loader in `aqhash_jax.pretrained_formats` maps keys one to one, and
so a training job can freeze the stem and the first stage by name (`conv1`, `bn1`, `layer1_*`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aqhash_jax.models import layers

# ImageNet channel statistics on the [0, 255] pixel scale, as torchvision's transforms use them
# (mean 0.485, 0.456, 0.406 and std 0.229, 0.224, 0.225 on the [0, 1] scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# (bottleneck width, number of blocks, stride of the first block) for layer1 .. layer4.
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
BOTTLENECK_EXPANSION = 4
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9


def check_images(images: jax.Array, module_name: str) -> None:
    """Raise ValueError unless `images` is a float [batch, H, W, 3] array."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{module_name} expects images of shape [batch, H, W, 3]; got shape {images.shape}. "
            "Add a batch axis with x[None] for a single image."
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{module_name} expects float images normalised with input_normalization(); got "
            f"dtype {images.dtype}. Convert to float32 and apply (pixels - mean) / std first."
        )


def _batch_norm(train: bool, dtype: Any, name: str, scale_init: Any = nn.initializers.ones):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPSILON,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )


class Bottleneck(nn.Module):
    """Bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand, plus the shortcut.

    Attributes:
      width: channels of the 1x1 and 3x3 convolutions; the block outputs 4 * width channels.
      strides: stride of the 3x3 convolution and of the projection shortcut.
      downsample: whether the shortcut is a 1x1 convolution with batch norm (torchvision's
        `downsample.0` and `downsample.1`) in place of the identity.
      dtype: computation dtype.
      conv_impl: "auto", "native" or "fast", passed to `layers.Conv`.
    """

    width: int
    strides: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_channels = self.width * BOTTLENECK_EXPANSION

        def conv(features: int, kernel: int, strides: int, padding: int, name: str) -> layers.Conv:
            return layers.Conv(
                features,
                (kernel, kernel),
                strides=strides,
                padding=((padding, padding), (padding, padding)),
                use_bias=False,
                dtype=self.dtype,
                impl=self.conv_impl,
                name=name,
            )

        y = conv(self.width, 1, 1, 0, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))

        y = conv(self.width, 3, self.strides, 1, "conv2")(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))

        y = conv(out_channels, 1, 1, 0, "conv3")(y)
        y = _batch_norm(train, self.dtype, "bn3")(y)

        shortcut = x
        if self.downsample:
            shortcut = conv(out_channels, 1, self.strides, 0, "downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)

        return nn.relu(y + shortcut)


class ResNet50(nn.Module):
    """ResNet-50 backbone returning its last two stages.

    `apply(variables, images, train=False)` takes float images [batch, H, W, 3] normalised with
    the ImageNet statistics (`IMAGENET_MEAN`, `IMAGENET_STD` on the [0, 255] scale) and returns a
    dict, every array in `dtype`:
      - "feature_maps": [layer3 output [batch, H/16, W/16, 1024], layer4 output
        [batch, H/32, W/32, 2048]] (sizes rounded up);
      - "pooled": [batch, 2048], the spatial mean of the layer4 output;
      - "logits": [batch, num_classes], only when include_top is True.
    With train=True batch norm normalises with batch statistics and updates "batch_stats", which
    must then be passed as mutable.

    Attributes:
      include_top: whether to add the ImageNet classifier `fc`.
      num_classes: outputs of `fc`.
      dtype: computation dtype (parameters stay float32).
      conv_impl: "auto", "native" or "fast", passed to every `layers.Conv`.
    """

    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
        check_images(images, "ResNet50")
        x = images.astype(self.dtype)

        x = layers.Conv(
            64,
            (7, 7),
            strides=2,
            padding=((3, 3), (3, 3)),
            use_bias=False,
            dtype=self.dtype,
            impl=self.conv_impl,
            name="conv1",
        )(x)
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        # Padding with -inf (what nn.max_pool does) matches torch's MaxPool2d(3, 2, padding=1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        stage_outputs = []
        in_channels = 64
        for stage_index, (width, num_blocks, stage_strides) in enumerate(RESNET50_STAGES):
            for block_index in range(num_blocks):
                strides = stage_strides if block_index == 0 else 1
                needs_projection = block_index == 0 and (
                    strides != 1 or in_channels != width * BOTTLENECK_EXPANSION
                )
                x = Bottleneck(
                    width,
                    strides=strides,
                    downsample=needs_projection,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"layer{stage_index + 1}_{block_index}",
                )(x, train=train)
                in_channels = width * BOTTLENECK_EXPANSION
            stage_outputs.append(x)

        pooled = jnp.mean(x, axis=(1, 2))
        outputs = {"feature_maps": [stage_outputs[2], stage_outputs[3]], "pooled": pooled}

        if self.include_top:
            outputs["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return outputs


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Bottleneck", "ResNet50", "check_images"]
