"""Full hashing model: a backbone followed by the attribute-query hashing head.

The parameter tree of ``HashModel`` is ``{"backbone": ..., "head": ...}`` in every variable
collection ("params", "batch_stats"). ``HashModel.from_features`` runs the head alone on
backbone feature maps (for training on a feature cache) and only creates and reads the
``"head"`` subtree, so a head trained on cached features joins pretrained backbone weights with
``join_params``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import linen as nn

from aqhash_jax.models.heads import AttributeHashHead, auxiliary_bit_count

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

BACKBONE_KEY = "backbone"
HEAD_KEY = "head"


class HashModel(nn.Module):
    """Backbone plus ``AttributeHashHead``.

    Attributes:
      backbone_name: a name known to ``aqhash_jax.models.backbones.create_backbone``, or None
        for a model that only runs ``from_features``.
      code_length ... feature_maps: passed to ``AttributeHashHead`` (see there).
      dtype: compute dtype of backbone and head (float32 or bfloat16); parameters are float32.
      conv_impl: convolution formulation of the backbone ("auto" picks per platform).
      image_size: input side in pixels, passed to the backbone (ViT position embeddings);
        None keeps the backbone's default.
      backbone_kwargs: extra keyword arguments for ``create_backbone`` (for example the ViT
        size overrides ``num_layers`` or ``hidden_size``); None for none.
    """

    backbone_name: str | None
    code_length: int
    width: int = 384
    num_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 1
    decoder_layers: int = 1
    query_self_attention: bool = False
    aux: str = "pairwise"
    aux_bits: int | None = None
    aux_total_bits: int = 96
    num_classes: int = 0
    norm: str = "batch"
    bottleneck_width: int = 256
    max_grid_size: int = 64
    compression_scale: float = 1.0
    learn_compression_scale: bool = False
    bit_norm: bool = False
    feature_maps: str = "all"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    image_size: int | None = None
    backbone_kwargs: Mapping[str, Any] | None = None

    def setup(self):
        self.head = AttributeHashHead(
            code_length=self.code_length,
            width=self.width,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            query_self_attention=self.query_self_attention,
            aux=self.aux,
            aux_bits=self.aux_bits,
            aux_total_bits=self.aux_total_bits,
            num_classes=self.num_classes,
            norm=self.norm,
            bottleneck_width=self.bottleneck_width,
            max_grid_size=self.max_grid_size,
            compression_scale=self.compression_scale,
            learn_compression_scale=self.learn_compression_scale,
            bit_norm=self.bit_norm,
            feature_maps=self.feature_maps,
            dtype=self.dtype,
        )

        if self.backbone_name is not None:
            # Imported here so that the head-only path works without the backbone modules.
            from aqhash_jax.models.backbones import create_backbone

            backbone_kwargs = {"dtype": self.dtype, "conv_impl": self.conv_impl, "include_top": False}
            if self.image_size is not None:
                backbone_kwargs["image_size"] = self.image_size
            backbone_kwargs.update(dict(self.backbone_kwargs or {}))
            self.backbone = create_backbone(self.backbone_name, **backbone_kwargs)

    @property
    def num_loss_bits(self) -> int:
        """K + A, the bits per image that the training loss takes (ADSH code matrix columns)."""
        return self.code_length + auxiliary_bit_count(
            self.aux, self.code_length, self.aux_bits, self.aux_total_bits
        )

    def __call__(self, images, train: bool, return_attention: bool = False):
        """Encode images.

        Args:
          images: float [B, H, W, 3], normalised with the backbone's ``input_normalization``.
          train: training mode (batch statistics, auxiliary bits).
          return_attention: also return the per-bit attention maps.

        Returns:
          The head's dict ("codes" float32 [B, K], and "aux_codes", "attention", "logits" as
          documented in ``AttributeHashHead``) plus "pooled" float [B, C], the backbone's pooled
          features.
        """
        if self.backbone_name is None:
            raise ValueError(
                "This HashModel has backbone_name=None, so it can only encode backbone feature "
                "maps: call apply(..., method=HashModel.from_features)."
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}.")

        backbone_outputs = self.backbone(images, train=train)
        outputs = self.head(backbone_outputs["feature_maps"], train, return_attention)
        outputs["pooled"] = backbone_outputs["pooled"]
        return outputs

    def from_features(self, feature_maps, train: bool, return_attention: bool = False):
        """Run the head alone on backbone feature maps (list of float [B, h, w, C]).

        Returns the head's dict. Reads only the ``"head"`` subtree of the variables.
        """
        return self.head(list(feature_maps), train, return_attention)


def build_model(model_config: Mapping[str, Any]) -> HashModel:
    """Build a ``HashModel`` from a model config (``ml_collections.ConfigDict`` or dict).

    Required fields: backbone (a backbone name, or None/"" for a head-only model), code_length.
    Optional fields with the head's defaults: width, num_heads, ffn_dim, encoder_layers,
    decoder_layers, query_self_attention, aux, aux_bits, aux_total_bits, num_classes, norm,
    bottleneck_width, max_grid_size, compression_scale, learn_compression_scale, bit_norm,
    feature_maps, dtype
    ("float32" or "bfloat16"), conv_impl, image_size, backbone_kwargs (a mapping).
    """
    for field in ("backbone", "code_length"):
        if field not in model_config:
            raise ValueError(f"The model config is missing the field {field!r}.")

    def get(name, default):
        value = model_config.get(name, default)
        return default if value is None and default is not None else value

    dtype_name = get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}.")

    backbone = model_config["backbone"] or None
    aux_bits = model_config.get("aux_bits", None)

    return HashModel(
        backbone_name=backbone,
        code_length=int(model_config["code_length"]),
        width=int(get("width", 384)),
        num_heads=int(get("num_heads", 8)),
        ffn_dim=int(get("ffn_dim", 2048)),
        encoder_layers=int(get("encoder_layers", 1)),
        decoder_layers=int(get("decoder_layers", 1)),
        query_self_attention=bool(get("query_self_attention", False)),
        aux=str(get("aux", "pairwise")),
        aux_bits=None if aux_bits is None else int(aux_bits),
        aux_total_bits=int(get("aux_total_bits", 96)),
        num_classes=int(get("num_classes", 0)),
        norm=str(get("norm", "batch")),
        bottleneck_width=int(get("bottleneck_width", 256)),
        max_grid_size=int(get("max_grid_size", 64)),
        compression_scale=float(get("compression_scale", 1.0)),
        learn_compression_scale=bool(get("learn_compression_scale", False)),
        bit_norm=bool(get("bit_norm", False)),
        feature_maps=str(get("feature_maps", "all")),
        dtype=DTYPES[dtype_name],
        conv_impl=str(get("conv_impl", "auto")),
        image_size=model_config.get("image_size", None),
        backbone_kwargs=dict(model_config.get("backbone_kwargs", None) or {}) or None,
    )


def split_params(variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split ``HashModel`` variables into (backbone_variables, head_variables).

    Args:
      variables: {collection: {"backbone": subtree, "head": subtree}}; a collection may lack
        either key (a head-only model has no "backbone", a head without batch norm has no
        "batch_stats" entry).

    Returns:
      Two dicts {collection: subtree} without the "backbone"/"head" prefix, so the head part
      applies directly to an ``AttributeHashHead`` and the backbone part to the backbone module.
      Collections absent from one side are left out of it.
    """
    backbone_variables: dict = {}
    head_variables: dict = {}
    for collection, tree in variables.items():
        unknown = set(tree) - {BACKBONE_KEY, HEAD_KEY}
        if unknown:
            raise ValueError(
                f"Collection {collection!r} has unexpected top-level keys {sorted(unknown)}; "
                f"HashModel variables only contain {BACKBONE_KEY!r} and {HEAD_KEY!r}."
            )
        if BACKBONE_KEY in tree:
            backbone_variables[collection] = tree[BACKBONE_KEY]
        if HEAD_KEY in tree:
            head_variables[collection] = tree[HEAD_KEY]
    return backbone_variables, head_variables


def join_params(backbone_variables: Mapping[str, Any], head_variables: Mapping[str, Any]) -> dict:
    """Join backbone and head variables (as returned by ``split_params``) into ``HashModel`` ones."""
    joined: dict = {}
    for collection, tree in backbone_variables.items():
        joined.setdefault(collection, {})[BACKBONE_KEY] = tree
    for collection, tree in head_variables.items():
        joined.setdefault(collection, {})[HEAD_KEY] = tree
    return joined
