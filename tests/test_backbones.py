"""Tests for the backbone registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.models import backbones

# Width D of each ViT variant.
VIT_WIDTHS = {"vit_ti16": 192, "vit_s16": 384, "vit_b16": 768, "vit_l16": 1024}


def _shapes(name, image_size, include_top=False, **kwargs):
    module = backbones.create_backbone(
        name, include_top=include_top, image_size=image_size, **kwargs
    )
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda key, x: module.init(key, x, train=False), jax.random.key(0), images
    )
    return jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, images)


def test_backbone_names_and_families():
    assert backbones.BACKBONE_NAMES == (
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "efficientnet_lite3",
        "efficientnet_lite4",
        "resnet50",
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vit_l16",
    )
    assert backbones.backbone_family("efficientnet_lite3") == "efficientnet"
    assert backbones.backbone_family("resnet50") == "resnet"
    assert backbones.backbone_family("vit_l16") == "vit"


@pytest.mark.parametrize("function", [backbones.backbone_family, backbones.input_normalization])
def test_unknown_backbone_lists_valid_names(function):
    with pytest.raises(ValueError, match="resnet50, vit_ti16") as error:
        function("resnet18")
    assert "'resnet18'" in str(error.value)

    with pytest.raises(ValueError, match="efficientnet_lite0"):
        backbones.create_backbone("vit_h14")


def test_unknown_keyword_raises():
    with pytest.raises(ValueError, match="patch_size"):
        backbones.create_backbone("resnet50", patch_size=8)
    with pytest.raises(ValueError, match="feature_maps"):
        backbones.create_backbone("vit_b16", feature_maps=2)


@pytest.mark.parametrize("image_size", [224, 160])
def test_resnet50_shapes(image_size):
    outputs = _shapes("resnet50", image_size, include_top=True)

    assert [m.shape for m in outputs["feature_maps"]] == [
        (2, image_size // 16, image_size // 16, 1024),
        (2, image_size // 32, image_size // 32, 2048),
    ]
    assert outputs["pooled"].shape == (2, 2048)
    assert outputs["logits"].shape == (2, 1000)


@pytest.mark.parametrize("name", sorted(VIT_WIDTHS))
@pytest.mark.parametrize("image_size", [224, 256])
def test_vit_shapes(name, image_size):
    outputs = _shapes(name, image_size)
    width = VIT_WIDTHS[name]
    grid = image_size // 16

    assert [m.shape for m in outputs["feature_maps"]] == [(2, grid, grid, width)]
    assert outputs["pooled"].shape == (2, width)
    assert "logits" not in outputs


@pytest.mark.parametrize("name", backbones.EFFICIENTNET_NAMES)
@pytest.mark.parametrize("image_size", [224, 160])
def test_efficientnet_shapes(name, image_size):
    outputs = _shapes(name, image_size, include_top=True)
    stage3, stage4 = outputs["feature_maps"]

    assert stage3.shape[:3] == (2, image_size // 16, image_size // 16)
    assert stage4.shape[:3] == (2, image_size // 32, image_size // 32)
    assert outputs["pooled"].shape[0] == 2
    assert outputs["logits"].shape == (2, 1000)


def test_vit_keyword_arguments_reach_model():
    outputs = _shapes("vit_s16", 224, patch_size=32, use_class_token=False, num_layers=2)

    assert outputs["feature_maps"][0].shape == (2, 7, 7, 384)
    assert backbones.feature_strides("vit_s16", patch_size=32) == (32,)


def test_feature_strides():
    assert backbones.feature_strides("resnet50") == (16, 32)
    assert backbones.feature_strides("efficientnet_lite2") == (16, 32)
    assert backbones.feature_strides("vit_b16") == (16,)
    with pytest.raises(ValueError, match="only to ViT"):
        backbones.feature_strides("resnet50", patch_size=8)


def test_input_normalization_values():
    mean, std = backbones.input_normalization("resnet50")
    vit_mean, vit_std = backbones.input_normalization("vit_b16")

    assert mean.dtype == np.float32
    assert mean.shape == (3,)
    np.testing.assert_allclose(mean, [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(std, [58.395, 57.12, 57.375], rtol=1e-6)
    np.testing.assert_allclose(vit_mean, [127.5] * 3)
    np.testing.assert_allclose(vit_std, [127.5] * 3)
    for name in backbones.EFFICIENTNET_NAMES:
        efficientnet_mean, efficientnet_std = backbones.input_normalization(name)
        assert efficientnet_mean.shape == (3,)
        assert efficientnet_std.shape == (3,)
        assert np.all(efficientnet_std > 0)


def test_create_backbone_passes_dtype_and_conv_impl():
    module = backbones.create_backbone("resnet50", dtype=jnp.bfloat16, conv_impl="native")
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    variables = jax.eval_shape(module.init, jax.random.key(0), images)
    outputs = jax.eval_shape(module.apply, variables, images)

    assert module.conv_impl == "native"
    assert outputs["pooled"].dtype == jnp.bfloat16
    assert variables["params"]["conv1"]["kernel"].dtype == jnp.float32
