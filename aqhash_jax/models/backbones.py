"""Backbone registry: build a backbone by name and look up its input normalisation and strides.

Every backbone follows one contract. `module.apply(variables, images, train=False)` takes float
images [batch, H, W, 3] already normalised with `input_normalization(name)` and returns a dict with
"feature_maps" (list of [batch, h, w, C]), "pooled" ([batch, C]) and, when built with
include_top=True, "logits" ([batch, num_classes]).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from aqhash_jax.models import resnet, vit

EFFICIENTNET_NAMES = tuple(f"efficientnet_lite{i}" for i in range(5))
RESNET_NAMES = ("resnet50",)
VIT_NAMES = ("vit_ti16", "vit_s16", "vit_b16", "vit_l16")
BACKBONE_NAMES = EFFICIENTNET_NAMES + RESNET_NAMES + VIT_NAMES

# Keyword arguments each family accepts in create_backbone besides the common ones.
_FAMILY_KWARGS = {
    "efficientnet": ("num_classes", "drop_path_rate", "dropout_rate"),
    "resnet": ("num_classes",),
    "vit": (
        "num_classes",
        "patch_size",
        "use_class_token",
        "hidden_size",
        "num_layers",
        "num_heads",
        "mlp_dim",
    ),
}


def backbone_family(name: str) -> str:
    """Return "efficientnet", "resnet" or "vit" for a backbone name.

    Raises ValueError listing the valid names when `name` is unknown.
    """
    if name in EFFICIENTNET_NAMES:
        return "efficientnet"
    if name in RESNET_NAMES:
        return "resnet"
    if name in VIT_NAMES:
        return "vit"
    raise ValueError(f"Unknown backbone {name!r}; valid names are {', '.join(BACKBONE_NAMES)}.")


def create_backbone(
    name: str,
    *,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    include_top: bool = False,
    image_size: int | tuple[int, int] = 224,
    **kwargs: Any,
) -> nn.Module:
    """Build the backbone `name` as a linen module.

    Args:
      name: one of BACKBONE_NAMES.
      dtype: computation dtype; parameters stay float32.
      conv_impl: "auto", "native" or "fast" (see `aqhash_jax.models.layers`).
      include_top: whether to add the ImageNet classifier and return "logits".
      image_size: input side in pixels or (height, width). The convolutional backbones accept any
        size and ignore it; a ViT needs it because its position embedding has one row per patch.
      **kwargs: `num_classes` for every family; `drop_path_rate` and `dropout_rate` for
        EfficientNet-Lite; for ViT also `patch_size`, `use_class_token` and
        the size overrides `hidden_size`, `num_layers`, `num_heads`, `mlp_dim`.

    Raises ValueError for an unknown name or a keyword the family does not accept.
    """
    family = backbone_family(name)
    unknown = sorted(set(kwargs) - set(_FAMILY_KWARGS[family]))
    if unknown:
        raise ValueError(
            f"create_backbone({name!r}) got unknown keyword arguments {unknown}; the {family} "
            f"family accepts {list(_FAMILY_KWARGS[family])}."
        )

    if family == "efficientnet":
        from aqhash_jax.models import efficientnet

        return efficientnet.EfficientNetLite(
            variant=name.removeprefix("efficientnet_"),
            include_top=include_top,
            dtype=dtype,
            conv_impl=conv_impl,
            **kwargs,
        )
    if family == "resnet":
        return resnet.ResNet50(include_top=include_top, dtype=dtype, conv_impl=conv_impl, **kwargs)
    return vit.VisionTransformer(
        variant=name.removeprefix("vit_"),
        image_size=image_size,
        include_top=include_top,
        dtype=dtype,
        conv_impl=conv_impl,
        **kwargs,
    )


def input_normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, std), float32 [3] each, to apply as (pixels - mean) / std on [0, 255] pixels.

    ResNet-50 uses the ImageNet statistics of torchvision; ViT scales pixels to [-1, 1] as the
    google-research/vision_transformer checkpoints expect; EfficientNet-Lite uses the values of
    `aqhash_jax.models.efficientnet.input_normalization`.
    """
    family = backbone_family(name)
    if family == "efficientnet":
        from aqhash_jax.models import efficientnet

        mean, std = efficientnet.input_normalization(name)
    elif family == "resnet":
        mean, std = resnet.IMAGENET_MEAN, resnet.IMAGENET_STD
    else:
        mean, std = vit.VIT_MEAN, vit.VIT_STD
    # efficientnet.input_normalization returns one scalar for all three channels.
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,)).copy()
    std = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,)).copy()
    return mean, std


def feature_strides(name: str, patch_size: int | None = None) -> tuple[int, ...]:
    """Return the stride in pixels of each entry of "feature_maps" for backbone `name`.

    The convolutional backbones return their stride-16 and stride-32 stages. A ViT returns one map
    whose stride is its patch size, and `patch_size` overrides the variant's as in create_backbone.
    """
    family = backbone_family(name)
    if family == "vit":
        variant_patch = vit.VIT_VARIANTS[name.removeprefix("vit_")][3]
        return (patch_size if patch_size is not None else variant_patch,)
    if patch_size is not None:
        raise ValueError(f"patch_size={patch_size} applies only to ViT backbones, not {name!r}.")
    return (16, 32)


__all__ = [
    "BACKBONE_NAMES",
    "backbone_family",
    "create_backbone",
    "feature_strides",
    "input_normalization",
]
