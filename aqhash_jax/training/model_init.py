"""Model construction and initial variables for the training job."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from aqhash_jax.models.hashing import HashModel, build_model


def model_config_dict(config: Any, code_length: int, num_classes: int) -> dict:
    """Return the plain dict that `build_model` takes (and that model_config.json stores)."""
    model = config.model
    return {
        "backbone": model.backbone,
        "code_length": int(code_length),
        "width": int(model.width),
        "num_heads": int(model.num_heads),
        "ffn_dim": int(model.ffn_dim),
        "encoder_layers": int(model.encoder_layers),
        "decoder_layers": int(model.decoder_layers),
        "query_self_attention": bool(model.query_self_attention),
        "aux": model.aux,
        "aux_bits": None if model.aux_bits is None else int(model.aux_bits),
        "aux_total_bits": int(model.aux_total_bits),
        "num_classes": int(num_classes),
        "norm": model.norm,
        "bottleneck_width": int(model.bottleneck_width),
        "compression_scale": float(model.compression_scale),
        "learn_compression_scale": bool(model.learn_compression_scale),
        "bit_norm": bool(model.bit_norm),
        "feature_maps": model.feature_maps,
        "dtype": model.dtype,
        "conv_impl": model.conv_impl,
        "image_size": int(config.data.image_size),
    }


def make_model(config: Any, code_length: int, num_classes: int) -> tuple[HashModel, dict]:
    model_dict = model_config_dict(config, code_length, num_classes)
    return build_model(model_dict), model_dict


def variables_fingerprint(variables: Any) -> str:
    """Return a sha256 over the paths, dtypes, shapes and bytes of a variable tree."""
    digest = hashlib.sha256()
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for path in sorted(flat, key=lambda p: tuple(map(str, p))):
        value = np.asarray(flat[path])
        digest.update("/".join(map(str, path)).encode())
        digest.update(str(value.dtype).encode() + str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _check_same_structure(expected: Any, loaded: Any, init: str) -> None:
    expected_flat = traverse_util.flatten_dict(expected)
    loaded_flat = traverse_util.flatten_dict(loaded)
    if set(expected_flat) != set(loaded_flat):
        missing = sorted("/".join(map(str, p)) for p in set(expected_flat) - set(loaded_flat))
        extra = sorted("/".join(map(str, p)) for p in set(loaded_flat) - set(expected_flat))
        raise ValueError(
            f"weights from config.model.init={init!r} do not match the backbone: missing "
            f"{missing[:3]}, unexpected {extra[:3]}; check config.model.backbone"
        )
    for path, value in expected_flat.items():
        if tuple(np.shape(loaded_flat[path])) != tuple(np.shape(value)):
            raise ValueError(
                f"weights from config.model.init={init!r}: {'/'.join(map(str, path))} has shape "
                f"{np.shape(loaded_flat[path])}, the backbone expects {np.shape(value)}"
            )


def backbone_variables(config: Any, rng: jax.Array) -> dict:
    """Return the initial backbone variables {"params": ..., "batch_stats": ...} (float32).

    "random" initialises them from `rng`; anything else goes through
    `aqhash_jax.pretrained.resolve_init`, and the result must match the backbone's tree.
    """
    size = int(config.data.image_size)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    from aqhash_jax.models.backbones import create_backbone

    module = create_backbone(
        config.model.backbone, dtype=jnp.float32, conv_impl=config.model.conv_impl, image_size=size
    )
    init = str(config.model.init)
    if init != "random":
        from aqhash_jax import pretrained

        loaded = pretrained.resolve_init(init, config.model.backbone)
        if loaded is not None:
            # Shapes only: tracing the initialiser is enough to check the loaded tree.
            expected = jax.eval_shape(lambda key: module.init(key, images, train=False), rng)
            loaded = jax.tree_util.tree_map(np.asarray, _plain(loaded))
            _check_same_structure(_plain(expected), loaded, init)
            logging.info("backbone %s: weights from %s", config.model.backbone, init)
            return loaded

    variables = jax.jit(lambda key: module.init(key, images, train=False))(rng)
    logging.info("backbone %s: random initialisation", config.model.backbone)
    return jax.tree_util.tree_map(np.asarray, _plain(jax.device_get(variables)))


def backbone_feature_shapes(config: Any) -> list[tuple[int, ...]]:
    """Return the [h, w, C] of each backbone feature map at `config.data.image_size` (no compile)."""
    from aqhash_jax.models.backbones import create_backbone

    size = int(config.data.image_size)
    module = create_backbone(
        config.model.backbone, dtype=jnp.float32, conv_impl=config.model.conv_impl, image_size=size
    )
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def features(key, images):
        variables = module.init(key, images, train=False)
        return module.apply(variables, images, train=False)["feature_maps"]

    shapes = jax.eval_shape(features, jax.random.PRNGKey(0), images)
    return [tuple(shape.shape[1:]) for shape in shapes]


def _plain(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {key: _plain(value) for key, value in tree.items()}
    return tree
