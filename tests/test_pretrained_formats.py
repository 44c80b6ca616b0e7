"""Tests for the ViT .npz and torchvision ResNet-50 checkpoint loaders.

The real checkpoints cannot be downloaded here, so the tests write small files in the real key
layouts and compare the loaded model against a forward pass computed in numpy from the file.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax import pretrained_formats
from aqhash_jax.models import resnet, vit

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8)
POSEMB = "Transformer/posembed_input/pos_embedding"


def _tiny_vit(image_size=32, **kwargs):
    options = {**TINY, **kwargs}
    return vit.VisionTransformer("ti16", image_size=image_size, **options)


def _template(model, image_size):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def _random_vit_arrays(model, image_size, seed=0):
    """Random weights for `model` under the vision_transformer .npz keys."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(_template(model, image_size)["params"], sep="/")
    return {
        key: rng.normal(0, 0.2, leaf.shape).astype(np.float32) for key, leaf in flat.items()
    }


def _save_npz(path, arrays):
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# numpy reference forward of a ViT .npz checkpoint (vision_transformer layout)
# ---------------------------------------------------------------------------------------------


def _layer_norm(x, arrays, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * arrays[f"{prefix}/scale"] + arrays[f"{prefix}/bias"]


def _numpy_vit_forward(arrays, images, patch, num_layers):
    """Return (patch tokens [b, gh, gw, D], pooled [b, D], logits or None) computed in numpy."""
    images = images.astype(np.float64)
    batch, height, width, _ = images.shape
    rows, columns = height // patch, width // patch
    kernel = arrays["embedding/kernel"]

    tokens = np.zeros((batch, rows, columns, kernel.shape[-1]))
    for i in range(rows):
        for j in range(columns):
            window = images[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            tokens[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    tokens = (tokens + arrays["embedding/bias"]).reshape(batch, rows * columns, -1)

    has_class_token = "cls" in arrays
    if has_class_token:
        cls = np.broadcast_to(arrays["cls"], (batch, 1, tokens.shape[-1]))
        tokens = np.concatenate([cls, tokens], axis=1)
    x = tokens + arrays[POSEMB]

    for index in range(num_layers):
        block = f"Transformer/encoderblock_{index}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        y = _layer_norm(x, arrays, f"{block}/LayerNorm_0")
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, arrays[f"{attention}/{name}/kernel"])
            + arrays[f"{attention}/{name}/bias"]
            for name in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqs,bshk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", attended, arrays[f"{attention}/out/kernel"])
        x = x + arrays[f"{attention}/out/bias"]

        mlp = f"{block}/MlpBlock_3"
        y = _layer_norm(x, arrays, f"{block}/LayerNorm_2")
        y = y @ arrays[f"{mlp}/Dense_0/kernel"] + arrays[f"{mlp}/Dense_0/bias"]
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        x = x + y @ arrays[f"{mlp}/Dense_1/kernel"] + arrays[f"{mlp}/Dense_1/bias"]

    x = _layer_norm(x, arrays, "Transformer/encoder_norm")
    patch_tokens = x[:, 1:] if has_class_token else x
    pooled = x[:, 0] if has_class_token else patch_tokens.mean(axis=1)
    logits = None
    if "head/kernel" in arrays:
        logits = pooled @ arrays["head/kernel"] + arrays["head/bias"]
    return patch_tokens.reshape(batch, rows, columns, -1), pooled, logits


def _numpy_bilinear(grid, new_rows, new_columns):
    """Bilinear resize with half-pixel centres and edge clamping, written independently."""
    rows, columns, _ = grid.shape

    def sample_weights(out_size, in_size):
        position = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
        position = np.clip(position, 0, in_size - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, position - low

    r0, r1, rw = sample_weights(new_rows, rows)
    c0, c1, cw = sample_weights(new_columns, columns)
    top = grid[r0][:, c0] * (1 - cw)[None, :, None] + grid[r0][:, c1] * cw[None, :, None]
    bottom = grid[r1][:, c0] * (1 - cw)[None, :, None] + grid[r1][:, c1] * cw[None, :, None]
    return top * (1 - rw)[:, None, None] + bottom * rw[:, None, None]


# ---------------------------------------------------------------------------------------------
# ViT tests
# ---------------------------------------------------------------------------------------------


def test_vit_npz_reproduces_numpy_forward(tmp_path):
    model = _tiny_vit(include_top=True, num_classes=5)
    arrays = _random_vit_arrays(model, 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)

    variables = pretrained_formats.load_vit_npz(path, _template(model, 32))
    outputs = model.apply(variables, images)
    tokens, pooled, logits = _numpy_vit_forward(arrays, images, patch=8, num_layers=2)

    np.testing.assert_allclose(outputs["feature_maps"][0], tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["pooled"], pooled, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-4, atol=1e-4)


def test_vit_npz_resizes_position_embedding(tmp_path):
    checkpoint_model = _tiny_vit(image_size=32)
    arrays = _random_vit_arrays(checkpoint_model, 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)
    model = _tiny_vit(image_size=48)
    images = np.random.default_rng(2).uniform(-1, 1, (1, 48, 48, 3)).astype(np.float32)

    variables = pretrained_formats.load_vit_npz(path, _template(model, 48))
    loaded = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]

    old = arrays[POSEMB]
    expected_grid = _numpy_bilinear(old[0, 1:].reshape(4, 4, 32), 6, 6).reshape(36, 32)
    assert loaded.shape == (1, 37, 32)
    np.testing.assert_array_equal(loaded[0, 0], old[0, 0])
    np.testing.assert_allclose(loaded[0, 1:], expected_grid, rtol=1e-5, atol=1e-6)

    resized_arrays = dict(arrays)
    resized_arrays[POSEMB] = np.concatenate([old[:, :1], expected_grid[None]], axis=1)
    outputs = model.apply(variables, images)
    tokens, pooled, _ = _numpy_vit_forward(resized_arrays, images, patch=8, num_layers=2)
    np.testing.assert_allclose(outputs["feature_maps"][0], tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["pooled"], pooled, rtol=1e-4, atol=1e-4)


def test_vit_npz_into_model_without_class_token(tmp_path):
    arrays = _random_vit_arrays(_tiny_vit(), 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)
    model = _tiny_vit(use_class_token=False)
    images = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)

    variables = pretrained_formats.load_vit_npz(path, _template(model, 32))
    outputs = model.apply(variables, images)

    assert "cls" not in variables["params"]
    without_class_token = {key: value for key, value in arrays.items() if key != "cls"}
    without_class_token[POSEMB] = arrays[POSEMB][:, 1:]
    tokens, pooled, _ = _numpy_vit_forward(without_class_token, images, patch=8, num_layers=2)
    np.testing.assert_allclose(outputs["feature_maps"][0], tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["pooled"], pooled, rtol=1e-4, atol=1e-4)


def _to_big_vision(arrays, scanned):
    """Rewrite vision_transformer-layout arrays in the big_vision layout."""
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    converted = {"params/pos_embedding": arrays[POSEMB][:, 1:]}
    blocks: dict[str, list[np.ndarray]] = {}
    for key, value in arrays.items():
        if key == POSEMB:
            continue
        if key.startswith("Transformer/encoderblock_"):
            _, block, module, rest = key.split("/", 3)
            name = f"{renames.get(module, module)}/{rest}"
            if scanned:
                blocks.setdefault(name, []).append(value)
                continue
            key = f"Transformer/{block}/{name}"
        converted[f"params/{key}"] = value
    for name, values in blocks.items():
        converted[f"params/Transformer/encoderblock/{name}"] = np.stack(values)
    return converted


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_layout_matches_vision_transformer(tmp_path, scanned):
    model = _tiny_vit(include_top=True, num_classes=5)
    arrays = _random_vit_arrays(model, 32)
    # big_vision adds no position embedding to the class token, which is a zero row here.
    arrays[POSEMB][:, 0] = 0.0
    reference_path = _save_npz(tmp_path / "vit.npz", arrays)
    big_vision_arrays = _to_big_vision(arrays, scanned)
    big_vision_path = _save_npz(tmp_path / "big_vision.npz", big_vision_arrays)
    template = _template(model, 32)

    assert pretrained_formats.detect_vit_layout(big_vision_arrays) == "big_vision"
    assert pretrained_formats.detect_vit_layout(arrays) == "vision_transformer"
    reference = pretrained_formats.load_vit_npz(reference_path, template)
    loaded = pretrained_formats.load_vit_npz(big_vision_path, template)

    reference_flat = flax.traverse_util.flatten_dict(reference["params"], sep="/")
    loaded_flat = flax.traverse_util.flatten_dict(loaded["params"], sep="/")
    assert sorted(loaded_flat) == sorted(reference_flat)
    for key, value in reference_flat.items():
        np.testing.assert_array_equal(loaded_flat[key], value, err_msg=key)


def test_vit_head_mismatch_raises(tmp_path):
    arrays = _random_vit_arrays(_tiny_vit(include_top=True, num_classes=5), 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)
    model = _tiny_vit(include_top=True, num_classes=7)

    with pytest.raises(ValueError, match="head/kernel"):
        pretrained_formats.load_vit_npz(path, _template(model, 32))

    headless = pretrained_formats.load_vit_npz(path, _template(_tiny_vit(), 32))
    assert "head" not in headless["params"]


def test_vit_pre_logits_with_head_raises(tmp_path):
    arrays = _random_vit_arrays(_tiny_vit(include_top=True, num_classes=5), 32)
    arrays["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    arrays["pre_logits/bias"] = np.zeros((32,), np.float32)
    path = _save_npz(tmp_path / "vit.npz", arrays)

    with pytest.raises(ValueError, match="pre_logits"):
        pretrained_formats.load_vit_npz(
            path, _template(_tiny_vit(include_top=True, num_classes=5), 32)
        )


def test_vit_width_mismatch_raises(tmp_path):
    arrays = _random_vit_arrays(_tiny_vit(), 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)
    wider = _tiny_vit(hidden_size=64)

    with pytest.raises(ValueError, match="width 32"):
        pretrained_formats.load_vit_npz(path, _template(wider, 32))


def test_vit_missing_file_names_path_and_source(tmp_path):
    missing = tmp_path / "ViT-B_16.npz"

    with pytest.raises(FileNotFoundError) as error:
        pretrained_formats.load_vit_npz(missing, _template(_tiny_vit(), 32))

    assert str(missing) in str(error.value)
    assert "gs://vit_models" in str(error.value)


def test_resize_position_embedding_identity_and_downsampling():
    grid = np.random.default_rng(4).normal(size=(6, 6, 3)).astype(np.float32)

    same = pretrained_formats.resize_position_embedding(grid, (6, 6))
    smaller = pretrained_formats.resize_position_embedding(grid, (4, 3))

    np.testing.assert_array_equal(same, grid)
    np.testing.assert_allclose(smaller, _numpy_bilinear(grid, 4, 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="new_grid"):
        pretrained_formats.resize_position_embedding(grid, (0, 3))


def test_split_position_embedding():
    with_class = np.arange(17 * 2, dtype=np.float32).reshape(1, 17, 2)
    without_class = with_class[:, 1:]

    class_row, grid = pretrained_formats.split_position_embedding(with_class)
    no_row, same_grid = pretrained_formats.split_position_embedding(without_class)

    np.testing.assert_array_equal(class_row, with_class[0, 0])
    assert grid.shape == (4, 4, 2)
    np.testing.assert_array_equal(grid[1, 0], with_class[0, 5])
    assert no_row is None
    np.testing.assert_array_equal(same_grid, grid)
    with pytest.raises(ValueError, match="square"):
        pretrained_formats.split_position_embedding(np.zeros((1, 7, 2), np.float32))


def test_detect_layout_rejects_other_archives():
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        pretrained_formats.detect_vit_layout({"weights": np.zeros(3)})


# ---------------------------------------------------------------------------------------------
# ResNet-50 key mapping (numpy only; the forward comparison with PyTorch is in test_resnet.py)
# ---------------------------------------------------------------------------------------------


def _torchvision_state_dict(seed=0):
    """Random arrays under torchvision's ResNet-50 keys and shapes, written out independently."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out_channels, in_channels, size):
        state[f"{name}.weight"] = rng.normal(size=(out_channels, in_channels, size, size))

    def batch_norm(name, channels):
        state[f"{name}.weight"] = rng.normal(size=channels)
        state[f"{name}.bias"] = rng.normal(size=channels)
        state[f"{name}.running_mean"] = rng.normal(size=channels)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2, size=channels)
        state[f"{name}.num_batches_tracked"] = np.array(7, dtype=np.int64)

    conv("conv1", 64, 3, 7)
    batch_norm("bn1", 64)
    in_channels = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", width, in_channels, 1)
            batch_norm(f"{prefix}.bn1", width)
            conv(f"{prefix}.conv2", width, width, 3)
            batch_norm(f"{prefix}.bn2", width)
            conv(f"{prefix}.conv3", width * 4, width, 1)
            batch_norm(f"{prefix}.bn3", width * 4)
            if block == 0:
                conv(f"{prefix}.downsample.0", width * 4, in_channels, 1)
                batch_norm(f"{prefix}.downsample.1", width * 4)
            in_channels = width * 4
    state["fc.weight"] = rng.normal(size=(1000, 2048))
    state["fc.bias"] = rng.normal(size=1000)
    return {
        key: value.astype(np.float32) if value.dtype == np.float64 else value
        for key, value in state.items()
    }


def _resnet_template(include_top):
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(resnet.ResNet50(include_top=include_top).init, jax.random.key(0), images)


def test_torchvision_keys_map_to_resnet_variables():
    state = _torchvision_state_dict()

    variables = pretrained_formats.torchvision_resnet50_to_variables(state, _resnet_template(True))
    params, stats = variables["params"], variables["batch_stats"]

    np.testing.assert_array_equal(
        params["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["layer3_0"]["downsample_conv"]["kernel"][0, 0],
        state["layer3.0.downsample.0.weight"][:, :, 0, 0].T,
    )
    np.testing.assert_array_equal(
        params["layer4_2"]["conv2"]["kernel"][0, 2], state["layer4.2.conv2.weight"][:, :, 0, 2].T
    )
    np.testing.assert_array_equal(params["layer2_1"]["bn3"]["scale"], state["layer2.1.bn3.weight"])
    np.testing.assert_array_equal(
        stats["layer1_0"]["downsample_bn"]["var"], state["layer1.0.downsample.1.running_var"]
    )
    np.testing.assert_array_equal(stats["bn1"]["mean"], state["bn1.running_mean"])
    np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].T)


def test_torchvision_keys_without_top_and_with_module_prefix():
    state = {f"module.{key}": value for key, value in _torchvision_state_dict().items()}

    variables = pretrained_formats.torchvision_resnet50_to_variables(state, _resnet_template(False))

    assert "fc" not in variables["params"]
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn1"]["var"], state["module.bn1.running_var"]
    )


def test_torchvision_missing_or_unexpected_key_raises():
    state = _torchvision_state_dict()
    template = _resnet_template(True)

    incomplete = {k: v for k, v in state.items() if k != "layer3.2.bn2.running_mean"}
    with pytest.raises(ValueError, match="layer3_2/bn2/mean"):
        pretrained_formats.torchvision_resnet50_to_variables(incomplete, template)

    with pytest.raises(ValueError, match="layer5"):
        pretrained_formats.torchvision_resnet50_to_variables(
            {**state, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}, template
        )


def test_torchvision_wrong_shape_raises():
    state = _torchvision_state_dict()
    state["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)

    with pytest.raises(ValueError, match="layer1_0/conv2/kernel"):
        pretrained_formats.torchvision_resnet50_to_variables(state, _resnet_template(True))


def test_resnet_missing_file_names_path_and_source(tmp_path):
    missing = tmp_path / "resnet50.pth"

    with pytest.raises(FileNotFoundError) as error:
        pretrained_formats.load_resnet50_torch(missing, _resnet_template(False))

    assert str(missing) in str(error.value)
    assert "IMAGENET1K_V1" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Loading by backbone name
# ---------------------------------------------------------------------------------------------


def test_load_backbone_weights_builds_vit_template(tmp_path):
    arrays = _random_vit_arrays(_tiny_vit(), 32)
    path = _save_npz(tmp_path / "vit.npz", arrays)

    variables = pretrained_formats.load_backbone_weights(
        path, "vit_ti16", image_size=48, **TINY
    )
    posemb = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]

    assert posemb.shape == (1, 37, 32)
    np.testing.assert_array_equal(variables["params"]["cls"], arrays["cls"])
    np.testing.assert_array_equal(
        variables["params"]["embedding"]["kernel"], arrays["embedding/kernel"]
    )


def test_load_backbone_weights_rejects_other_families(tmp_path):
    with pytest.raises(ValueError, match="No released-weights loader"):
        pretrained_formats.load_backbone_weights(tmp_path / "w.pth", "efficientnet_lite0")
    with pytest.raises(ValueError, match="Unknown backbone"):
        pretrained_formats.load_backbone_weights(tmp_path / "w.pth", "resnet101")


def test_resolve_init_reads_vit_npz(tmp_path):
    from aqhash_jax import pretrained

    model = vit.VisionTransformer("ti16", image_size=32)
    arrays = _random_vit_arrays(model, 32)
    path = _save_npz(tmp_path / "ViT-Ti_16.npz", arrays)

    variables = pretrained.resolve_init(str(path), backbone="vit_ti16")
    flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")

    assert sorted(flat) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    assert pretrained_formats.checkpoint_image_size(path, "vit_ti16") == 32


def test_resolve_init_reads_resnet_pth(tmp_path):
    torch = pytest.importorskip("torch", reason="torch.save writes the test's .pth file")
    from aqhash_jax import pretrained

    state = _torchvision_state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()}, path)

    variables = pretrained.resolve_init(str(path), backbone="resnet50")

    np.testing.assert_array_equal(
        variables["params"]["layer4_0"]["conv3"]["kernel"],
        state["layer4.0.conv3.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer2_3"]["bn1"]["var"], state["layer2.3.bn1.running_var"]
    )
    assert "fc" not in variables["params"]


@pytest.mark.parametrize(
    "backbone, source_hint", [("vit_b16", "gs://vit_models"), ("resnet50", "IMAGENET1K_V1")]
)
def test_registry_loader_imagenet_names_weight_source(backbone, source_hint):
    from aqhash_jax import pretrained

    assert "vit" in pretrained.registered_families()
    assert "resnet" in pretrained.registered_families()
    with pytest.raises(FileNotFoundError, match=source_hint):
        pretrained_formats.load_for_registry(backbone, "imagenet")


def test_loaders_registered_without_import():
    # A fresh interpreter that imports only aqhash_jax.pretrained must still find the loaders.
    import subprocess
    import sys

    code = (
        "from aqhash_jax import pretrained\n"
        "pretrained._find_loader('vit_b16')\n"
        "pretrained._find_loader('resnet50')\n"
        "print(pretrained.registered_families())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert "'resnet'" in result.stdout
    assert "'vit'" in result.stdout
