"""Vision Transformer in the parameter layout of google-research/vision_transformer.

The model is the ViT of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021). It has
a strided patch embedding, an optional class token and learned position embeddings. Pre-norm
encoder blocks follow (LayerNorm, multi-head self-attention, residual, LayerNorm, GELU MLP of 4x
width, residual), then a final LayerNorm. Parameter names and shapes follow the released checkpoints of
google-research/vision_transformer (`embedding`, `cls`, `Transformer/posembed_input/
pos_embedding`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query` with kernel
[D, heads, head_dim], `MlpBlock_3/Dense_0`, `Transformer/encoder_norm`, `head`), so
`aqhash_jax.pretrained_formats.load_vit_npz` copies them without renaming. As in that release,
the position embedding has one row per patch plus a first row for the class token when the
model uses one, LayerNorm uses epsilon 1e-6 and the MLP uses the tanh approximation of GELU
(`flax.linen.gelu`'s default).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aqhash_jax.models import layers
from aqhash_jax.models.resnet import check_images

# variant -> (width D, depth, heads, patch size). MLP width is 4 * D for every variant.
VIT_VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "ti16": (192, 12, 3, 16),
    "s16": (384, 12, 6, 16),
    "b16": (768, 12, 12, 16),
    "l16": (1024, 24, 16, 16),
}
MLP_RATIO = 4
LAYER_NORM_EPSILON = 1e-6

# The releases feed pixels scaled to [-1, 1]: (pixels - 127.5) / 127.5 on the [0, 255] scale.
VIT_MEAN = (127.5, 127.5, 127.5)
VIT_STD = (127.5, 127.5, 127.5)


def grid_shape(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Return the patch grid (rows, columns) of an image of `image_size` pixels.

    Raises ValueError when a side is not a positive multiple of `patch_size`.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or patch_size <= 0:
        raise ValueError(
            f"image_size={image_size!r} and patch_size={patch_size!r} are invalid; give an int or "
            "a (height, width) pair and a positive patch size."
        )
    if any(side <= 0 or side % patch_size for side in size):
        raise ValueError(
            f"image_size={image_size!r} is not a positive multiple of patch_size={patch_size}; "
            f"resize images to a multiple of {patch_size} pixels."
        )
    return (size[0] // patch_size, size[1] // patch_size)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Rearrange images [batch, H, W, C] into patches [batch, H/p, W/p, p * p * C].

    The last axis is ordered (row in patch, column in patch, channel), the row-major flattening
    of an HWIO kernel's first three axes, so a patch times the flattened kernel equals one output
    pixel of the stride-p convolution.
    """
    batch, height, width, channels = images.shape
    rows, columns = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, columns, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows, columns, patch_size * patch_size * channels)


class PatchEmbedding(nn.Module):
    """Patch embedding: a p x p convolution with stride p and no padding.

    Parameters match `flax.linen.Conv` (`kernel` [p, p, 3, D], `bias` [D]). The "fast"
    formulation rearranges the image into patches and multiplies by the flattened kernel (one
    matrix product, the fast path on CPU); "native" calls `lax.conv_general_dilated`. "auto"
    chooses as `layers.resolve_conv_impl` does.

    Attributes:
      features: embedding width D.
      patch_size: p.
      dtype: computation dtype.
      impl: "auto", "native" or "fast".
    """

    features: int
    patch_size: int
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Embed images float [batch, H, W, C] into tokens [batch, H/p, W/p, features]."""
        p = self.patch_size
        height, width, channels = images.shape[1:]
        if height % p or width % p:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of patch_size={p}; resize or crop "
                f"images to a multiple of {p} pixels."
            )

        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x = images.astype(self.dtype)
        kernel = kernel.astype(self.dtype)

        if layers.resolve_conv_impl(self.impl) == "fast":
            y = jnp.dot(patchify(x, p), kernel.reshape(p * p * channels, self.features))
        else:
            y = layers.conv_native(x, kernel, (p, p), ((0, 0), (0, 0)), feature_group_count=1)
        return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameters of `flax.linen.MultiHeadDotProductAttention`.

    `query`, `key` and `value` have kernel [D, heads, head_dim] and bias [heads, head_dim]; `out`
    has kernel [heads, head_dim, D] and bias [D]. Softmax runs in float32 for every `dtype`.
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend over tokens x [batch, tokens, D]; return [batch, tokens, D]."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"Width {width} is not divisible by num_heads={self.num_heads}.")
        head_dim = width // self.num_heads

        def projection(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                kernel_init=nn.initializers.xavier_uniform(),
                name=name,
            )

        query = projection("query")(x) / np.sqrt(head_dim).astype(np.float32)
        key = projection("key")(x)
        value = projection("value")(x)

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)

        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(attended)


class MlpBlock(nn.Module):
    """Two-layer MLP with GELU (tanh approximation): D -> mlp_dim -> D."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense_kwargs = dict(
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        y = nn.Dense(self.mlp_dim, name="Dense_0", **dense_kwargs)(x)
        y = nn.gelu(y)
        return nn.Dense(width, name="Dense_1", **dense_kwargs)(y)


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: x + attention(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_0")(x)
        y = SelfAttention(self.num_heads, dtype=self.dtype, name="MultiHeadDotProductAttention_1")(y)
        x = x + y

        y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_3")(y)
        return x + y


class PositionEmbedding(nn.Module):
    """Learned additive position embedding `pos_embedding` [1, tokens, D]."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        posemb = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, tokens.shape[1], tokens.shape[2]),
            jnp.float32,
        )
        return tokens + posemb.astype(self.dtype)


class Transformer(nn.Module):
    """`posembed_input`, `depth` blocks `encoderblock_{i}` and the final LayerNorm `encoder_norm`."""

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Encode tokens [batch, N, D] (class token first, if any); return [batch, N, D]."""
        x = PositionEmbedding(dtype=self.dtype, name="posembed_input")(tokens)
        for index in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"encoderblock_{index}"
            )(x)
        return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
    """ViT backbone returning its patch tokens on their grid.

    `apply(variables, images, train=False)` takes float images [batch, H, W, 3] scaled to [-1, 1]
    (`VIT_MEAN`, `VIT_STD` on the [0, 255] scale); H and W must match `image_size`, because the
    position embedding has one row per patch. It returns a dict, every array in `dtype`:
      - "feature_maps": [patch tokens after the final LayerNorm, [batch, H/p, W/p, D]];
      - "pooled": [batch, D], the class token's output, or the mean of the patch tokens when
        use_class_token is False;
      - "logits": [batch, num_classes] from `head` applied to "pooled", only when include_top.
    `train` is accepted for the backbone contract; the model has no dropout or batch norm.

    Attributes:
      variant: "ti16", "s16", "b16" or "l16" (width, depth, heads, patch size from VIT_VARIANTS).
      image_size: input side in pixels, or a (height, width) pair.
      patch_size: overrides the variant's patch size when given.
      use_class_token: whether to prepend the learned class token `cls`.
      include_top: whether to add the classifier `head`.
      num_classes: outputs of `head`.
      dtype: computation dtype (parameters stay float32).
      conv_impl: "auto", "native" or "fast" for the patch embedding.
      hidden_size, num_layers, num_heads, mlp_dim: override the variant's width D, depth, heads
        and MLP width (4 * D) when given, for example to build a small model in tests.
    """

    variant: str = "b16"
    image_size: int | tuple[int, int] = 224
    patch_size: int | None = None
    use_class_token: bool = True
    include_top: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None

    def architecture(self) -> tuple[int, int, int, int, int]:
        """Return (width, depth, heads, MLP width, patch size) of this model."""
        if self.variant not in VIT_VARIANTS:
            raise ValueError(
                f"variant={self.variant!r} is unknown; use one of {sorted(VIT_VARIANTS)}."
            )
        width, depth, heads, patch = VIT_VARIANTS[self.variant]
        width = self.hidden_size if self.hidden_size is not None else width
        depth = self.num_layers if self.num_layers is not None else depth
        heads = self.num_heads if self.num_heads is not None else heads
        mlp_dim = self.mlp_dim if self.mlp_dim is not None else MLP_RATIO * width
        patch = self.patch_size if self.patch_size is not None else patch
        return width, depth, heads, mlp_dim, patch

    def grid(self) -> tuple[int, int]:
        """Return the patch grid (rows, columns) for `image_size`."""
        return grid_shape(self.image_size, self.architecture()[4])

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
        check_images(images, "VisionTransformer")
        width, depth, heads, mlp_dim, patch = self.architecture()
        rows, columns = self.grid()
        if images.shape[1:3] != (rows * patch, columns * patch):
            raise ValueError(
                f"VisionTransformer was built for image_size={self.image_size!r} "
                f"({rows * patch}x{columns * patch} pixels); got images of shape {images.shape}. "
                "Build the model with the image size you feed it."
            )

        x = PatchEmbedding(width, patch, dtype=self.dtype, impl=self.conv_impl, name="embedding")(
            images
        )
        batch = x.shape[0]
        x = x.reshape(batch, rows * columns, width)

        if self.use_class_token:
            cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, width), jnp.float32)
            cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width))
            x = jnp.concatenate([cls, x], axis=1)

        x = Transformer(depth, heads, mlp_dim, dtype=self.dtype, name="Transformer")(x)

        if self.use_class_token:
            pooled, patch_tokens = x[:, 0], x[:, 1:]
        else:
            patch_tokens = x
            pooled = jnp.mean(patch_tokens, axis=1)

        outputs = {
            "feature_maps": [patch_tokens.reshape(batch, rows, columns, width)],
            "pooled": pooled,
        }
        if self.include_top:
            outputs["logits"] = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                kernel_init=nn.initializers.zeros_init(),
                name="head",
            )(pooled)
        return outputs


__all__ = [
    "MLP_RATIO",
    "VIT_MEAN",
    "VIT_STD",
    "VIT_VARIANTS",
    "EncoderBlock",
    "MlpBlock",
    "PatchEmbedding",
    "PositionEmbedding",
    "SelfAttention",
    "Transformer",
    "VisionTransformer",
    "grid_shape",
    "patchify",
]
