"""Load released ImageNet weights into the ViT and ResNet-50 backbones.

Two formats are read:

- ViT `.npz` files of google-research/vision_transformer (for example the AugReg ImageNet-21k and
  ImageNet-1k fine-tuned files of the gs://vit_models bucket) and of google-research/big_vision.
  Both are flat archives whose keys are "/"-joined Flax parameter paths. The vision_transformer
  layout uses `Transformer/posembed_input/pos_embedding` (with a first row for the class token when
  the model has one) and blocks named `LayerNorm_0`, `MultiHeadDotProductAttention_1`,
  `LayerNorm_2`, `MlpBlock_3`. The big_vision layout prefixes every key with `params/` and stores
  the position embedding of the patches only, at `params/pos_embedding`, because the class token
  gets none. Its blocks are named `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
  `MlpBlock_0`, and a scanned model stacks all blocks on a leading axis under
  `Transformer/encoderblock`.
- torchvision ResNet-50 state dicts (`.pth`, as saved for `ResNet50_Weights.IMAGENET1K_V1`), read
  without PyTorch by `aqhash_jax.torch_checkpoint.load_torch_state_dict`.

Every loader takes the variables of the target module (arrays or `jax.ShapeDtypeStruct`s, for
example from `jax.eval_shape(module.init, ...)`), fills every leaf from the checkpoint and returns
numpy float32 variables of the same structure. A leaf the checkpoint cannot fill raises ValueError.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

VIT_DOWNLOAD_HINT = (
    "Download a ViT .npz file from the google-research/vision_transformer GitHub release notes "
    "(files in the gs://vit_models bucket, for example gs://vit_models/augreg/) or a "
    "google-research/big_vision checkpoint."
)
RESNET_DOWNLOAD_HINT = (
    "Save torchvision's ResNet50_Weights.IMAGENET1K_V1 weights as a state dict, for example "
    "torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'resnet50.pth')."
)

VISION_TRANSFORMER_LAYOUT = "vision_transformer"
BIG_VISION_LAYOUT = "big_vision"

# big_vision block names -> vision_transformer block names (the names of aqhash_jax.models.vit).
_BIG_VISION_BLOCK_RENAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_POSEMB_PATH = "Transformer/posembed_input/pos_embedding"


def _check_file(path: str | os.PathLike, hint: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} not found. {hint}")
    return path


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(variables), sep="/")


def _fill(
    template: Mapping[str, Any], values: dict[str, np.ndarray], source: str
) -> dict[str, Any]:
    """Build a variables tree shaped like `template` from flat "/"-joined `values`.

    Raises ValueError naming every template leaf that `values` lacks or gives a wrong shape.
    """
    flat_template = _flatten(template)
    missing = sorted(key for key in flat_template if key not in values)
    if missing:
        raise ValueError(
            f"{source} has no weights for {len(missing)} parameters of the model, first "
            f"{missing[:5]}. Check that the checkpoint matches the backbone (variant, include_top)."
        )

    mismatched = [
        f"{key!r} has shape {tuple(values[key].shape)}, the model expects {tuple(leaf.shape)}"
        for key, leaf in flat_template.items()
        if tuple(values[key].shape) != tuple(leaf.shape)
    ]
    if mismatched:
        raise ValueError(
            f"{source}: {len(mismatched)} weights do not fit the model: {'; '.join(mismatched[:5])}. "
            "Check the backbone variant, num_classes and image size."
        )

    filled = {key: values[key] for key in flat_template}
    return traverse_util.unflatten_dict(filled, sep="/")


def _as_float32(name: str, array: np.ndarray, source: str) -> np.ndarray:
    """Return `array` as float32; checkpoints store float16, bfloat16 or float32 weights."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{source}: weight {name!r} has dtype {array.dtype}; expected a float.")
    return array.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------


def resize_position_embedding(
    grid_embedding: np.ndarray, new_grid: tuple[int, int]
) -> np.ndarray:
    """Resize a position-embedding grid by bilinear interpolation.

    Args:
      grid_embedding: float [rows, columns, D], the embeddings of the patch positions.
      new_grid: (new_rows, new_columns).

    Returns float32 [new_rows, new_columns, D]. Sample positions use half-pixel centres
    (`jax.image.resize` with method "bilinear" and no antialiasing), so the resized grid covers
    the same image area as the original.
    """
    grid_embedding = np.asarray(grid_embedding)
    if grid_embedding.ndim != 3:
        raise ValueError(
            f"grid_embedding must have shape [rows, columns, D]; got {grid_embedding.shape}."
        )
    new_grid = tuple(int(n) for n in new_grid)
    if len(new_grid) != 2 or min(new_grid) <= 0:
        raise ValueError(f"new_grid={new_grid!r} is invalid; give two positive ints.")
    if tuple(grid_embedding.shape[:2]) == new_grid:
        return grid_embedding.astype(np.float32)

    resized = jax.image.resize(
        jnp.asarray(grid_embedding, dtype=jnp.float32),
        (*new_grid, grid_embedding.shape[2]),
        method="bilinear",
        antialias=False,
    )
    return np.asarray(resized, dtype=np.float32)


def _square_side(count: int) -> int | None:
    side = math.isqrt(count)
    return side if side * side == count else None


def split_position_embedding(posemb: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Split a checkpoint's position embedding [1, N, D] into its class-token row and its grid.

    Released checkpoints use square grids, so N is a square (no class-token row) or a square plus
    one (the first row belongs to the class token). Returns (class row [D] or None, grid
    [side, side, D]); raises ValueError for any other N.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"Position embedding must have shape [1, N, D]; got {posemb.shape}.")
    count, width = posemb.shape[1], posemb.shape[2]

    side = _square_side(count)
    if side is not None:
        return None, posemb[0].reshape(side, side, width)
    side = _square_side(count - 1)
    if side is not None:
        return posemb[0, 0], posemb[0, 1:].reshape(side, side, width)
    raise ValueError(
        f"Position embedding with {count} rows is neither a square patch grid nor a square grid "
        "plus a class-token row; only square checkpoint grids are supported."
    )


def detect_vit_layout(arrays: Mapping[str, np.ndarray]) -> str:
    """Return "vision_transformer" or "big_vision" for the keys of a ViT `.npz` checkpoint."""
    if any(key.startswith("params/") for key in arrays):
        return BIG_VISION_LAYOUT
    if _POSEMB_PATH in arrays or "embedding/kernel" in arrays:
        return VISION_TRANSFORMER_LAYOUT
    raise ValueError(
        "The archive is not a ViT checkpoint of google-research/vision_transformer (no "
        f"'embedding/kernel' or {_POSEMB_PATH!r}) or big_vision (no 'params/' keys); first keys: "
        f"{sorted(arrays)[:5]}."
    )


def _big_vision_to_vision_transformer(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename big_vision keys to the vision_transformer layout and unstack scanned blocks.

    The position embedding keeps its big_vision form (patch rows only) under `_POSEMB_PATH`;
    `vit_arrays_to_params` handles the missing class-token row.
    """
    renamed: dict[str, np.ndarray] = {}
    block_pattern = re.compile(r"^Transformer/encoderblock(_\d+)?/([^/]+)/(.*)$")

    for key, value in arrays.items():
        if not key.startswith("params/"):
            continue
        name = key.removeprefix("params/")
        if name == "pos_embedding":
            renamed[_POSEMB_PATH] = value
            continue

        match = block_pattern.match(name)
        if match is None:
            renamed[name] = value
            continue
        suffix, module, rest = match.groups()
        module = _BIG_VISION_BLOCK_RENAMES.get(module, module)
        if suffix is not None:
            renamed[f"Transformer/encoderblock{suffix}/{module}/{rest}"] = value
        else:
            # A scanned encoder stores block i of every weight at index i of a leading axis.
            for index in range(value.shape[0]):
                renamed[f"Transformer/encoderblock_{index}/{module}/{rest}"] = value[index]
    return renamed


def vit_arrays_to_params(
    arrays: Mapping[str, np.ndarray],
    params_template: Mapping[str, Any],
    grid: tuple[int, int] | None = None,
    source: str = "ViT checkpoint",
) -> dict[str, Any]:
    """Map the arrays of a ViT `.npz` checkpoint onto the params of `VisionTransformer`.

    Args:
      arrays: the archive's arrays by key, in the vision_transformer or big_vision layout.
      params_template: the model's "params" tree (arrays or ShapeDtypeStructs).
      grid: the model's patch grid (rows, columns); None means a square grid inferred from the
        template's position embedding.
      source: name of the checkpoint in error messages.

    The position embedding's grid is resized bilinearly when the model's grid differs. The class
    token's row is kept when the model has a class token and dropped when it has none. When the
    model has a class token and the checkpoint has no class-token row (big_vision, or a
    global-average-pooling checkpoint), the model's row is zero, which is what big_vision computes.
    A model class token missing from the checkpoint is set to zero with a warning. Returns float32
    numpy params; raises ValueError when a weight is missing or has the wrong shape.
    """
    layout = detect_vit_layout(arrays)
    values = {key: _as_float32(key, value, source) for key, value in arrays.items()}
    if layout == BIG_VISION_LAYOUT:
        values = _big_vision_to_vision_transformer(values)
    logging.info("Reading %s in the %s layout.", source, layout)

    flat_template = _flatten(params_template)
    if _POSEMB_PATH not in flat_template:
        raise ValueError(f"The model params have no {_POSEMB_PATH!r}; is it a VisionTransformer?")
    if _POSEMB_PATH not in values:
        raise ValueError(f"{source} has no position embedding ({_POSEMB_PATH!r} or 'params/pos_embedding').")

    # Position embedding: resize the grid, then add or drop the class-token row.
    target_rows, width = flat_template[_POSEMB_PATH].shape[1:]
    model_has_class_token = "cls" in flat_template
    target_patches = target_rows - 1 if model_has_class_token else target_rows
    if grid is None:
        side = _square_side(target_patches)
        if side is None:
            raise ValueError(
                f"The model's position embedding has {target_patches} patch rows, which is not a "
                "square grid; pass grid=(rows, columns)."
            )
        grid = (side, side)
    if grid[0] * grid[1] != target_patches:
        raise ValueError(
            f"grid={grid} has {grid[0] * grid[1]} patches but the model's position embedding "
            f"has {target_patches} patch rows."
        )

    class_row, grid_embedding = split_position_embedding(values[_POSEMB_PATH])
    if grid_embedding.shape[-1] != width:
        raise ValueError(
            f"{source} has width {grid_embedding.shape[-1]} but the model has width {width}; "
            "choose the matching ViT variant."
        )
    if tuple(grid_embedding.shape[:2]) != tuple(grid):
        logging.info(
            "Resizing the position embedding of %s from grid %s to %s.",
            source,
            grid_embedding.shape[:2],
            grid,
        )
    rows = [resize_position_embedding(grid_embedding, grid).reshape(target_patches, width)]
    if model_has_class_token:
        if class_row is None:
            class_row = np.zeros((width,), np.float32)
        rows.insert(0, class_row.reshape(1, width))
    values[_POSEMB_PATH] = np.concatenate(rows, axis=0)[None]

    if model_has_class_token and "cls" not in values:
        logging.warning("%s has no class token; the model's class token starts at zero.", source)
        values["cls"] = np.zeros((1, 1, width), np.float32)

    # Head: a representation layer (pre_logits) in the checkpoint feeds its head, so that head
    # cannot be reused on the class token directly.
    if "head/kernel" in flat_template and any(key.startswith("pre_logits/") for key in values):
        raise ValueError(
            f"{source} has a pre_logits layer before its head, which VisionTransformer lacks; "
            "build the backbone with include_top=False."
        )

    ignored = sorted(
        key for key in values if key not in flat_template and not key.startswith("params/")
    )
    if ignored:
        logging.info("Ignoring %d weights of %s, first %s.", len(ignored), source, ignored[:5])
    return _fill(params_template, values, source)


def load_vit_npz(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Load a ViT `.npz` checkpoint into the variables of a `VisionTransformer`.

    Args:
      path: the `.npz` file.
      variables: the model's variables ({"params": ...}), arrays or ShapeDtypeStructs.
      grid: the model's patch grid, needed only for a non-square image size.

    Returns the variables with float32 numpy params from the checkpoint. Raises
    FileNotFoundError when `path` does not exist and ValueError when it does not fit the model.
    """
    path = _check_file(path, VIT_DOWNLOAD_HINT)
    if "params" not in variables:
        raise ValueError("variables must contain a 'params' collection (the output of model.init).")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}

    loaded = dict(variables)
    loaded["params"] = vit_arrays_to_params(arrays, variables["params"], grid, source=str(path))
    return loaded


# ---------------------------------------------------------------------------------------------
# ResNet-50
# ---------------------------------------------------------------------------------------------

_RESNET_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
_BATCH_NORM_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _torchvision_target(key: str) -> tuple[str, str] | None:
    """Return (collection, "/"-joined path) for a torchvision ResNet key; None to skip it."""
    if key.endswith("num_batches_tracked"):
        return None

    match = _RESNET_BLOCK_KEY.match(key)
    if match is not None:
        stage, block, layer, field = match.groups()
        layer = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(layer, layer)
        prefix = f"layer{stage}_{block}/{layer}"
    else:
        layer, _, field = key.partition(".")
        if layer not in ("conv1", "bn1", "fc") or "." in field:
            raise ValueError(f"Unexpected key {key!r} in a torchvision ResNet-50 state dict.")
        prefix = layer

    if prefix == "fc":
        if field not in ("weight", "bias"):
            raise ValueError(f"Unexpected key {key!r} in a torchvision ResNet-50 state dict.")
        return ("params", "fc/kernel" if field == "weight" else "fc/bias")
    if prefix.endswith("downsample_conv") or re.search(r"conv\d$", prefix):
        if field != "weight":
            raise ValueError(f"Unexpected key {key!r}: torchvision ResNet convolutions have no bias.")
        return ("params", f"{prefix}/kernel")
    if field not in _BATCH_NORM_FIELDS:
        raise ValueError(f"Unexpected key {key!r} in a torchvision ResNet-50 state dict.")
    collection, name = _BATCH_NORM_FIELDS[field]
    return (collection, f"{prefix}/{name}")


def torchvision_resnet50_to_variables(
    state_dict: Mapping[str, np.ndarray],
    variables_template: Mapping[str, Any],
    source: str = "ResNet-50 state dict",
) -> dict[str, Any]:
    """Map a torchvision ResNet-50 state dict onto the variables of `ResNet50`.

    Args:
      state_dict: torchvision keys (`conv1.weight`, `layer3.5.bn2.running_var`, `fc.bias`, ...)
        to arrays; a "module." prefix (from DataParallel) is removed.
      variables_template: the model's {"params": ..., "batch_stats": ...} (arrays or
        ShapeDtypeStructs).
      source: name of the checkpoint in error messages.

    Convolution kernels go from OIHW to HWIO and `fc.weight` from [out, in] to [in, out]; batch-norm
    weight/bias become scale/bias and running_mean/running_var become batch_stats mean/var. The
    classifier is ignored when the model has none. Returns float32 numpy variables.
    """
    for collection in ("params", "batch_stats"):
        if collection not in variables_template:
            raise ValueError(
                f"variables_template must contain {collection!r} (the output of ResNet50.init)."
            )

    values: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    for raw_key, array in state_dict.items():
        key = raw_key.removeprefix("module.")
        target = _torchvision_target(key)
        if target is None:
            continue
        collection, path = target

        array = _as_float32(key, array, source)
        if path.endswith("/kernel") and array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        elif path == "fc/kernel":
            array = array.T
        values[collection][path] = np.ascontiguousarray(array)

    if "fc" not in variables_template["params"] and "fc/kernel" in values["params"]:
        logging.info("Ignoring the classifier fc of %s (model built without include_top).", source)
        values["params"] = {k: v for k, v in values["params"].items() if not k.startswith("fc/")}
    for collection, collection_values in values.items():
        unexpected = sorted(set(collection_values) - set(_flatten(variables_template[collection])))
        if unexpected:
            raise ValueError(
                f"{source} has weights the model lacks: {unexpected[:5]}. Is it a ResNet-50 "
                "state dict?"
            )

    loaded = dict(variables_template)
    loaded["params"] = _fill(variables_template["params"], values["params"], source)
    loaded["batch_stats"] = _fill(variables_template["batch_stats"], values["batch_stats"], source)
    return loaded


def load_resnet50_torch(path: str | os.PathLike, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Load a torchvision ResNet-50 `.pth` state dict into the variables of `ResNet50`.

    Reads the file without PyTorch (`aqhash_jax.torch_checkpoint.load_torch_state_dict`). Raises
    FileNotFoundError when `path` does not exist and ValueError when it does not fit the model.
    """
    path = _check_file(path, RESNET_DOWNLOAD_HINT)
    from aqhash_jax.torch_checkpoint import load_torch_state_dict

    state_dict = load_torch_state_dict(path)
    return torchvision_resnet50_to_variables(state_dict, variables, source=str(path))


# ---------------------------------------------------------------------------------------------
# Loading by backbone name, and registration with aqhash_jax.pretrained
# ---------------------------------------------------------------------------------------------

# File suffixes each backbone family reads, for init strings that give only a path.
CHECKPOINT_SUFFIXES = {"vit": (".npz",), "resnet": (".pth", ".pt")}


def load_backbone_weights(
    path: str | os.PathLike,
    backbone: str,
    *,
    image_size: int | tuple[int, int] = 224,
    include_top: bool = False,
    **backbone_kwargs: Any,
) -> dict[str, Any]:
    """Load released weights for the backbone named `backbone` (a ViT or "resnet50").

    Builds the backbone with `create_backbone(backbone, image_size=..., include_top=...,
    **backbone_kwargs)`, takes its variable shapes with `jax.eval_shape` (no initialisation) and
    fills them from `path` with `load_vit_npz` or `load_resnet50_torch`. Returns float32 numpy
    variables ({"params"} for ViT, {"params", "batch_stats"} for ResNet-50).

    Raises FileNotFoundError for a missing file and ValueError for another backbone family or a
    checkpoint that does not fit.
    """
    from aqhash_jax.models import backbones

    family = backbones.backbone_family(backbone)
    if family not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"No released-weights loader for backbone {backbone!r}; this module reads ViT "
            "(.npz) and ResNet-50 (.pth) checkpoints."
        )

    module = backbones.create_backbone(
        backbone, image_size=image_size, include_top=include_top, **backbone_kwargs
    )
    side = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    images = jax.ShapeDtypeStruct((1, *side, 3), jnp.float32)
    template = jax.eval_shape(module.init, jax.random.key(0), images)

    if family == "vit":
        return load_vit_npz(path, template, grid=module.grid())
    return load_resnet50_torch(path, template)


def checkpoint_image_size(path: str | os.PathLike, backbone: str, patch_size: int | None = None) -> int:
    """Return the image side in pixels that a ViT `.npz` checkpoint's position embedding encodes.

    The side is the checkpoint's (square) patch grid times the patch size of `backbone`, or
    `patch_size` when given.
    """
    from aqhash_jax.models import vit

    path = _check_file(path, VIT_DOWNLOAD_HINT)
    with np.load(path, allow_pickle=False) as archive:
        key = _POSEMB_PATH if _POSEMB_PATH in archive.files else "params/pos_embedding"
        if key not in archive.files:
            raise ValueError(f"{str(path)!r} has no position embedding; is it a ViT checkpoint?")
        _, grid = split_position_embedding(archive[key])

    variant_patch = vit.VIT_VARIANTS[backbone.removeprefix("vit_")][3]
    return grid.shape[0] * (patch_size if patch_size is not None else variant_patch)


def load_for_registry(
    name: str, source: str, image_size: int | tuple[int, int] | None = None
) -> dict[str, Any]:
    """Load weights for `aqhash_jax.pretrained.resolve_init`: loader(name, source[, image_size]).

    `source` must be a checkpoint path, because no ViT or ResNet-50 weights ship with a package.
    For a ViT without `image_size` the position embedding keeps the checkpoint's own grid.
    """
    from aqhash_jax.models import backbones

    family = backbones.backbone_family(name)
    hint = VIT_DOWNLOAD_HINT if family == "vit" else RESNET_DOWNLOAD_HINT
    if source == "imagenet":
        raise FileNotFoundError(
            f"No packaged ImageNet weights for {name!r}; set init to the checkpoint file path. {hint}"
        )
    if family == "vit" and image_size is None:
        image_size = checkpoint_image_size(source, name)
    return load_backbone_weights(source, name, image_size=image_size or 224)


def register_formats() -> None:
    """Register the ViT and ResNet-50 loaders with `aqhash_jax.pretrained.register_loader`.

    The loaders are registered under the families "vit" and "resnet" with the registry's calling
    convention loader(name, source), plus an optional image_size for ViT position embeddings.
    Importing this module registers them.
    """
    from aqhash_jax import pretrained

    for family in CHECKPOINT_SUFFIXES:
        pretrained.register_loader(family, load_for_registry)


register_formats()


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "checkpoint_image_size",
    "detect_vit_layout",
    "load_backbone_weights",
    "load_for_registry",
    "register_formats",
    "load_resnet50_torch",
    "load_vit_npz",
    "resize_position_embedding",
    "split_position_embedding",
    "torchvision_resnet50_to_variables",
    "vit_arrays_to_params",
]
