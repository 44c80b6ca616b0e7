"""Tests for the ResNet-50 backbone, checked against a torchvision-layout PyTorch model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax import pretrained_formats
from aqhash_jax.models import resnet

IMAGE_SIZE = 64


def _build_torch_resnet50(torch):
    """Build a ResNet-50 from torch.nn with torchvision's module names and v1.5 strides."""
    nn = torch.nn

    class TorchBottleneck(nn.Module):
        def __init__(self, in_channels, width, stride):
            super().__init__()
            out_channels = width * 4
            self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out_channels)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or in_channels != out_channels:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            shortcut = x if self.downsample is None else self.downsample(x)
            return self.relu(y + shortcut)

    class TorchResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            in_channels = 64
            for index, (width, blocks, stride) in enumerate(
                [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]
            ):
                stage = []
                for block in range(blocks):
                    stage.append(TorchBottleneck(in_channels, width, stride if block == 0 else 1))
                    in_channels = width * 4
                setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer2(self.layer1(x))
            stage3 = self.layer3(x)
            stage4 = self.layer4(stage3)
            pooled = stage4.mean(dim=(2, 3))
            return stage3, stage4, pooled, self.fc(pooled)

    return TorchResNet50()


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """A random torchvision-layout ResNet-50, its .pth file, its outputs and loaded variables."""
    torch = pytest.importorskip("torch", reason="PyTorch builds the reference ResNet-50")
    torch.manual_seed(0)
    model = _build_torch_resnet50(torch).eval()

    # Random batch-norm statistics and affine weights, so the mapping of every field is checked.
    # bn3 gets small scales to keep the residual sum bounded over 16 blocks.
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                channels = module.num_features
                scale = 0.2 if name.endswith("bn3") or name.endswith("downsample.1") else 1.0
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, channels) * scale))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, channels)))
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, channels)))
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, channels)))

    path = tmp_path_factory.mktemp("resnet") / "resnet50.pth"
    torch.save(model.state_dict(), path)

    images = rng.normal(0, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        outputs = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    stage3, stage4, pooled, logits = (o.numpy() for o in outputs)
    expected = {
        "stage3": stage3.transpose(0, 2, 3, 1),
        "stage4": stage4.transpose(0, 2, 3, 1),
        "pooled": pooled,
        "logits": logits,
    }

    template = jax.eval_shape(
        resnet.ResNet50(include_top=True).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
    )
    state_dict = {key: value.numpy() for key, value in model.state_dict().items()}
    variables = pretrained_formats.torchvision_resnet50_to_variables(state_dict, template)
    return {
        "images": images,
        "expected": expected,
        "variables": variables,
        "template": template,
        "path": path,
    }


def _assert_close_relative(actual, expected, tolerance):
    actual = np.asarray(actual, np.float32)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("conv_impl", ["fast", "native"])
def test_resnet50_matches_torch(torch_reference, conv_impl):
    model = resnet.ResNet50(include_top=True, conv_impl=conv_impl)

    outputs = jax.jit(model.apply)(torch_reference["variables"], torch_reference["images"])
    expected = torch_reference["expected"]

    _assert_close_relative(outputs["feature_maps"][0], expected["stage3"], 1e-4)
    _assert_close_relative(outputs["feature_maps"][1], expected["stage4"], 1e-4)
    _assert_close_relative(outputs["pooled"], expected["pooled"], 1e-4)
    _assert_close_relative(outputs["logits"], expected["logits"], 1e-4)


def test_load_resnet50_torch_file_matches_state_dict(torch_reference):
    loaded = pretrained_formats.load_resnet50_torch(
        torch_reference["path"], torch_reference["template"]
    )

    expected_leaves = jax.tree_util.tree_leaves_with_path(torch_reference["variables"])
    loaded_leaves = dict(jax.tree_util.tree_leaves_with_path(loaded))
    assert len(loaded_leaves) == len(expected_leaves)
    for path, expected in expected_leaves:
        np.testing.assert_array_equal(loaded_leaves[path], expected, err_msg=str(path))


def test_resnet50_bfloat16_close_to_float32(torch_reference):
    model = resnet.ResNet50(include_top=True, dtype=jnp.bfloat16)

    outputs = jax.jit(model.apply)(torch_reference["variables"], torch_reference["images"])
    expected = torch_reference["expected"]

    assert outputs["pooled"].dtype == jnp.bfloat16
    _assert_close_relative(outputs["pooled"], expected["pooled"], 0.05)
    _assert_close_relative(outputs["logits"], expected["logits"], 0.05)


def test_resnet50_train_updates_batch_stats(torch_reference):
    model = resnet.ResNet50()
    variables = dict(torch_reference["variables"])
    variables["params"] = {k: v for k, v in variables["params"].items() if k != "fc"}

    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, torch_reference["images"]
    )

    old_mean = variables["batch_stats"]["bn1"]["mean"]
    new_mean = np.asarray(updates["batch_stats"]["bn1"]["mean"])
    assert new_mean.shape == (64,)
    assert not np.allclose(new_mean, old_mean)


@pytest.mark.parametrize("image_size, stage3_side, stage4_side", [(224, 14, 7), (160, 10, 5)])
def test_resnet50_output_shapes(image_size, stage3_side, stage4_side):
    model = resnet.ResNet50(include_top=True, num_classes=200)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)

    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outputs = jax.eval_shape(model.apply, variables, images)

    assert outputs["feature_maps"][0].shape == (2, stage3_side, stage3_side, 1024)
    assert outputs["feature_maps"][1].shape == (2, stage4_side, stage4_side, 2048)
    assert outputs["pooled"].shape == (2, 2048)
    assert outputs["logits"].shape == (2, 200)


def test_resnet50_without_top_has_no_logits():
    model = resnet.ResNet50()
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)

    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    outputs = jax.eval_shape(model.apply, variables, images)

    assert "logits" not in outputs
    assert "fc" not in variables["params"]
    assert sorted(variables["params"]["layer3_0"]) == [
        "bn1",
        "bn2",
        "bn3",
        "conv1",
        "conv2",
        "conv3",
        "downsample_bn",
        "downsample_conv",
    ]
    assert "downsample_conv" not in variables["params"]["layer3_1"]
    assert variables["params"]["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_resnet50_rejects_invalid_images():
    model = resnet.ResNet50()
    with pytest.raises(ValueError, match=r"\[batch, H, W, 3\]"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((224, 224, 3), jnp.float32))
    with pytest.raises(ValueError, match="float images"):
        jax.eval_shape(
            model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
        )
