"""Hashing head: subtle-feature refine layer, attribute-query decoder, auxiliary bits.

The head follows Wang et al., "Learning Attribute-Aware Hash Codes for Fine-Grained Image
Retrieval via Query Optimization" (ICML 2025). Each of the K bits is produced by one learnable
query that cross-attends to refined image tokens. The decoded attribute feature a_k is
compressed to one bit by h_k = tanh(w . a_k / ||a_k||) with one vector w shared by all bits,
and the binary code is sign(h) at inference.

Layout of the parameter tree under the head (all parameters float32):

- ``subtle_features``: the top-down fusion of the two CNN stages (``lateral``, ``top_down_*``),
  the per-scale projections (``project_0``, ``project_1``), the learned row/column position
  embeddings (``position_0``, ``position_1``) and the transformer encoder (``encoder_*``).
- ``queries``: float32 [K, width], one query per bit.
- ``decoder``: the attribute-query decoder layers and its final LayerNorm.
- ``compression``: the shared vector ``w`` (and ``log_scale`` when the scale is learned).
- ``classifier``: only when ``num_classes > 0``.

The auxiliary branch has no parameters of its own. Its queries are computed from ``queries`` and
decoded and compressed by the shared weights, so the parameters that inference reads are exactly
the parameters that training updates. ``train=False`` never builds the auxiliary queries.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

AUX_BRANCHES = ("none", "pairwise", "rolled")
NORMS = ("batch", "layer")
FEATURE_MAP_CHOICES = ("all", "last")
BIT_NORM_EPSILON = 1e-5

_warned_messages: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it occurs in this process.

    Module code runs once per trace, and a training job traces the same configuration several
    times (init, train step, eval step), so repeats are dropped.
    """
    if message not in _warned_messages:
        _warned_messages.add(message)
        logging.warning(message)


# ---------------------------------------------------------------------------------------------
# Auxiliary branch plans (pure Python, no parameters)
# ---------------------------------------------------------------------------------------------


def pairwise_query_pairs(code_length: int, num_pairs: int) -> np.ndarray:
    """Return the deterministic list of attribute pairs used by the pairwise auxiliary branch.

    Pairs are unordered and distinct. They are enumerated by circular offset: first
    (k, k+1 mod K) for every k, then (k, k+2 mod K), and so on, skipping pairs already taken.
    So the default of K pairs links every bit to its neighbour, and larger counts reach
    further apart.

    Args:
      code_length: K, the number of main bits.
      num_pairs: P, the number of auxiliary bits, at most K * (K - 1) / 2.

    Returns:
      int32 [P, 2] array of bit indices (i, j) with i != j.
    """
    if code_length < 1:
        raise ValueError(f"code_length must be >= 1, got {code_length}.")
    max_pairs = code_length * (code_length - 1) // 2
    if num_pairs < 0 or num_pairs > max_pairs:
        raise ValueError(
            f"aux_bits={num_pairs} is invalid for the pairwise auxiliary branch at code_length="
            f"{code_length}: it needs between 0 and K*(K-1)/2 = {max_pairs} distinct pairs. "
            "Lower aux_bits or use aux='none'."
        )

    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for offset in range(1, code_length):
        for first in range(code_length):
            if len(pairs) == num_pairs:
                break
            second = (first + offset) % code_length
            key = (min(first, second), max(first, second))
            if key in seen:
                continue
            seen.add(key)
            pairs.append((first, second))
        if len(pairs) == num_pairs:
            break

    return np.asarray(pairs, dtype=np.int32).reshape(num_pairs, 2)


def rolled_copy_count(code_length: int, aux_total_bits: int = 96) -> int:
    """Return R, the number of copies of every query in the rolled auxiliary branch.

    R = max(1, aux_total_bits // K). The reference PyTorch release uses aux_total_bits = 96, so
    K = 64 gives R = 1 (no auxiliary bits). For K > aux_total_bits the plain formula gives R = 0,
    which would decode no bits at all, so R is clamped to 1 and the branch becomes a no-op.
    """
    if code_length < 1:
        raise ValueError(f"code_length must be >= 1, got {code_length}.")
    if aux_total_bits < 1:
        raise ValueError(f"aux_total_bits must be >= 1, got {aux_total_bits}.")
    return max(1, aux_total_bits // code_length)


def rolled_copy_shifts(width: int, copies: int) -> list[int]:
    """Return the channel shifts of the rolled query copies 1 .. R-1.

    Copy i is the query vector rolled circularly along its channel axis by floor(i * width / R)
    positions, which moves sub-vectors from one attention head to another.
    """
    return [(index * width) // copies for index in range(1, copies)]


def auxiliary_bit_count(
    aux: str,
    code_length: int,
    aux_bits: int | None = None,
    aux_total_bits: int = 96,
) -> int:
    """Return A, the number of auxiliary bits a head produces in training.

    The training loss takes K + A bits per image (``"codes"`` followed by ``"aux_codes"``), so an
    ADSH code matrix must have K + A columns.

    Args:
      aux: "none", "pairwise" or "rolled".
      code_length: K.
      aux_bits: pairwise branch only: number of attribute pairs (default K).
      aux_total_bits: rolled branch only: target total K * R of main plus rolled bits.
    """
    if aux not in AUX_BRANCHES:
        raise ValueError(f"aux must be one of {AUX_BRANCHES}, got {aux!r}.")
    if aux_bits is not None and aux != "pairwise":
        raise ValueError(
            f"aux_bits={aux_bits} only applies to aux='pairwise', but aux={aux!r}. "
            "Set aux_bits to None (for aux='rolled' the count comes from aux_total_bits)."
        )

    if aux == "none":
        return 0

    if aux == "pairwise":
        count = code_length if aux_bits is None else int(aux_bits)
        max_pairs = code_length * (code_length - 1) // 2
        if count > max_pairs or count < 0:
            raise ValueError(
                f"aux_bits={count} is invalid at code_length={code_length}: the pairwise branch "
                f"has at most {max_pairs} distinct pairs."
            )
        return count

    copies = rolled_copy_count(code_length, aux_total_bits)
    return (copies - 1) * code_length


def select_feature_maps(feature_maps: Sequence[Any], choice: str) -> list:
    """Return the backbone maps that a head with ``feature_maps=choice`` reads.

    "all" keeps every map and "last" keeps only the last one (the stride-32 map of a CNN).
    """
    if choice not in FEATURE_MAP_CHOICES:
        raise ValueError(f"feature_maps must be one of {FEATURE_MAP_CHOICES}, got {choice!r}.")
    feature_maps = list(feature_maps)
    return feature_maps[-1:] if choice == "last" else feature_maps


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention that also returns its weights.

    Projections run in ``dtype`` with float32 parameters; the attention logits and the softmax
    are computed in float32.

    Attributes:
      num_heads: number of heads; the input width must be divisible by it.
      dtype: compute dtype (float32 or bfloat16).
    """

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, key, value):
        """Attend from ``query`` to ``key``/``value``.

        Args:
          query: [B, Lq, D].
          key: [B, Lk, D].
          value: [B, Lk, D].

        Returns:
          (output [B, Lq, D] in ``dtype``, weights float32 [B, Lq, Lk] averaged over heads; each
          row sums to 1).
        """
        width = query.shape[-1]
        if width % self.num_heads != 0:
            raise ValueError(
                f"Attention width {width} is not divisible by num_heads={self.num_heads}. "
                "Choose a width that is a multiple of num_heads."
            )
        head_dim = width // self.num_heads

        def project(name):
            return nn.DenseGeneral(
                features=(self.num_heads, head_dim),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )

        q = project("query")(query)
        k = project("key")(key)
        v = project("value")(value)

        logits = jnp.einsum(
            "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
        ).astype(jnp.float32)
        logits = logits / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1)

        attended = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        output = nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="out",
        )(attended)

        return output, jnp.mean(weights, axis=1)


class FeedForward(nn.Module):
    """Two dense layers with a ReLU between them: D -> hidden_dim -> D."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        hidden = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x)
        hidden = nn.relu(hidden)
        return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(hidden)


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; position embeddings go to queries and keys only."""

    num_heads: int
    ffn_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, position):
        """Refine ``tokens`` [B, T, D] with ``position`` [T, D]; returns [B, T, D]."""
        query_key = tokens + position.astype(tokens.dtype)
        attended, _ = MultiHeadAttention(self.num_heads, self.dtype, name="self_attention")(
            query_key, query_key, tokens
        )
        tokens = _layer_norm("self_attention_norm", self.dtype)(tokens + attended)

        update = FeedForward(self.ffn_dim, self.dtype, name="ffn")(tokens)
        return _layer_norm("ffn_norm", self.dtype)(tokens + update)


class LearnedPosition2D(nn.Module):
    """Learned row and column position embeddings for one token grid.

    The embedding of grid cell (y, x) is concat(column[x], row[y]), width D. Tables hold
    ``max_grid_size`` rows and columns so the parameter shapes do not depend on the image size.
    """

    width: int
    max_grid_size: int = 64

    @nn.compact
    def __call__(self, height: int, width: int):
        """Return float32 [height * width, D] in row-major grid order."""
        if height > self.max_grid_size or width > self.max_grid_size:
            raise ValueError(
                f"Token grid {height}x{width} exceeds max_grid_size={self.max_grid_size}. "
                "Raise max_grid_size in the head configuration or use smaller images."
            )
        column_width = self.width // 2
        row_width = self.width - column_width
        init = nn.initializers.truncated_normal(stddev=0.02)
        column_table = self.param("column", init, (self.max_grid_size, column_width), jnp.float32)
        row_table = self.param("row", init, (self.max_grid_size, row_width), jnp.float32)

        column = jnp.broadcast_to(column_table[None, :width], (height, width, column_width))
        row = jnp.broadcast_to(row_table[:height, None], (height, width, row_width))
        return jnp.concatenate([column, row], axis=-1).reshape(height * width, self.width)


class SubtleFeatureExtractor(nn.Module):
    """Fuse backbone feature maps into position-embedded tokens and refine them.

    Two maps (CNN: stride 16 [B, h3, w3, C3] and stride 32 [B, h4, w4, C4]): the stride-32 map
    goes through a learned upsampling bottleneck (1x1 conv C4 -> bottleneck_width + norm,
    transposed conv kernel 4 stride 2 + norm, 1x1 conv -> C3 + norm, ReLU) and is added to a
    1x1 conv (C3 -> C3) of the stride-16 map. The fused stride-16 map and the stride-32 map are
    each projected to ``width`` by their own 1x1 conv followed by a LayerNorm, and their tokens
    are concatenated
    (14x14 + 7x7 = 245 tokens for a 224 px ResNet-50 input).

    One map (ViT patch grid [B, h, w, C]): the tokens are projected to ``width``.

    Each scale has its own learned row/column position embedding, added to queries and keys of
    the encoder (and of the decoder's cross-attention) but never to the values. With
    ``encoder_layers=0`` the projected tokens pass straight through.

    1x1 convolutions are written as dense layers over the channel axis, which is the same
    operation and a plain matrix product on every backend.

    Attributes:
      width: token width d.
      num_heads, ffn_dim, encoder_layers: transformer encoder settings.
      norm: "batch" (the reference release) or "layer", used in the upsampling bottleneck.
      bottleneck_width: channels inside the upsampling bottleneck (256 in the release).
      max_grid_size: largest token grid side that the position tables cover.
      dtype: compute dtype.
    """

    width: int = 384
    num_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 1
    norm: str = "batch"
    bottleneck_width: int = 256
    max_grid_size: int = 64
    dtype: Any = jnp.float32

    def _norm(self, name: str, train: bool):
        if self.norm == "batch":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )
        return _layer_norm(name, self.dtype)

    def _dense(self, features: int, name: str, use_bias: bool = True):
        return nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )

    def _fuse_top_down(self, stage3, stage4, train: bool):
        """Return the fused stride-16 map [B, h3, w3, C3]."""
        channels3 = stage3.shape[-1]

        upsampled = self._dense(self.bottleneck_width, "top_down_reduce", use_bias=False)(stage4)
        upsampled = self._norm("top_down_reduce_norm", train)(upsampled)
        upsampled = nn.ConvTranspose(
            self.bottleneck_width,
            kernel_size=(4, 4),
            strides=(2, 2),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="top_down_upsample",
        )(upsampled)
        upsampled = self._norm("top_down_upsample_norm", train)(upsampled)
        upsampled = self._dense(channels3, "top_down_expand", use_bias=False)(upsampled)
        upsampled = self._norm("top_down_expand_norm", train)(upsampled)
        upsampled = nn.relu(upsampled)

        # A stride-16 map of odd size (e.g. 13 at 208 px) has a stride-32 map of ceil(13/2) = 7,
        # which upsamples to 14; the extra row and column are cropped.
        height, width = stage3.shape[1:3]
        upsampled = upsampled[:, :height, :width]

        return self._dense(channels3, "lateral")(stage3) + upsampled

    @nn.compact
    def __call__(self, feature_maps: Sequence[jax.Array], train: bool):
        """Return (tokens [B, T, width] in ``dtype``, position float32 [T, width]).

        T = h3*w3 + h4*w4 for two maps, h*w for one map.
        """
        maps = [jnp.asarray(feature_map).astype(self.dtype) for feature_map in feature_maps]

        if len(maps) == 2:
            stage3, stage4 = maps
            scales = [self._fuse_top_down(stage3, stage4, train), stage4]
        else:
            scales = maps

        tokens = []
        positions = []
        for index, scale in enumerate(scales):
            batch, height, width, _ = scale.shape
            projected = self._dense(self.width, f"project_{index}")(scale)
            # Backbone stages differ in scale (EfficientNet-Lite0: the stride-16 map has a
            # standard deviation near 6, the ReLU6 stride-32 map near 0.7), so without a norm
            # the larger map dominates every attention logit.
            projected = _layer_norm(f"project_{index}_norm", self.dtype)(projected)
            tokens.append(projected.reshape(batch, height * width, self.width))
            positions.append(
                LearnedPosition2D(self.width, self.max_grid_size, name=f"position_{index}")(
                    height, width
                )
            )
        tokens = jnp.concatenate(tokens, axis=1)
        position = jnp.concatenate(positions, axis=0)

        for layer in range(self.encoder_layers):
            tokens = EncoderLayer(self.num_heads, self.ffn_dim, self.dtype, name=f"encoder_{layer}")(
                tokens, position
            )

        return tokens, position


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: optional query self-attention, cross-attention, FFN.

    As in DETR, the query vectors act as the positional part of the decoder state: they are
    added to the attention queries of every layer, while the state itself starts at zero.
    """

    num_heads: int
    ffn_dim: int
    self_attention: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, state, query_position, memory, memory_position):
        """Update the decoder state.

        Args:
          state: [B, Q, D] decoder state.
          query_position: [Q, D] query vectors.
          memory: [B, T, D] refined image tokens.
          memory_position: [T, D] their position embeddings.

        Returns:
          (state [B, Q, D], cross-attention weights float32 [B, Q, T] averaged over heads).
        """
        query_position = query_position.astype(state.dtype)

        if self.self_attention:
            query_key = state + query_position
            attended, _ = MultiHeadAttention(self.num_heads, self.dtype, name="self_attention")(
                query_key, query_key, state
            )
            state = _layer_norm("self_attention_norm", self.dtype)(state + attended)

        keys = memory + memory_position.astype(memory.dtype)
        attended, weights = MultiHeadAttention(self.num_heads, self.dtype, name="cross_attention")(
            state + query_position, keys, memory
        )
        state = _layer_norm("cross_attention_norm", self.dtype)(state + attended)

        update = FeedForward(self.ffn_dim, self.dtype, name="ffn")(state)
        state = _layer_norm("ffn_norm", self.dtype)(state + update)

        return state, weights


class AttributeQueryDecoder(nn.Module):
    """Decode one attribute feature per query from the refined image tokens.

    Without query self-attention every query is decoded independently of the others, so
    decoding a set of queries in one batch gives the same features as decoding each alone.
    """

    num_layers: int = 1
    num_heads: int = 8
    ffn_dim: int = 2048
    self_attention: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries, memory, memory_position):
        """Decode ``queries`` [Q, D] against ``memory`` [B, T, D] and ``memory_position`` [T, D].

        Returns:
          (attribute features [B, Q, D] in ``dtype``, last layer's cross-attention weights
          float32 [B, Q, T] averaged over heads).
        """
        batch = memory.shape[0]
        state = jnp.zeros((batch,) + queries.shape, dtype=memory.dtype)

        weights = None
        for layer in range(self.num_layers):
            state, weights = DecoderLayer(
                self.num_heads, self.ffn_dim, self.self_attention, self.dtype, name=f"layer_{layer}"
            )(state, queries, memory, memory_position)

        return _layer_norm("final_norm", self.dtype)(state), weights


class BitCompression(nn.Module):
    """Compress attribute features to continuous bits: h_k = tanh(s * w . a_k / ||a_k||).

    ``w`` [D] is shared by all bits and has no bias. The reference release has no scale (s = 1).
    ``scale`` sets a fixed s, and ``learn_scale`` makes s = exp(log_scale) a parameter initialised
    at ``scale``. Because ||w|| already multiplies the cosine, a learned s adds no expressive
    power; it only changes how fast the codes can saturate under a given learning rate.

    With ``bit_norm`` the projection z_k = w . a_k / ||a_k|| is standardised per bit over the
    batch (batch normalisation without affine parameters, running statistics at inference)
    before the scale and the tanh: h_k = tanh(s * (z_k - mean_k) / std_k). Without it, the part
    of a_k that all images share dominates z_k at the start of training, so every image gets
    nearly the same code and pairwise losses settle in that collapsed state (measured on cub100:
    mAP@all at chance level). Standardising makes each bit split the batch into two halves from
    the first step. Only the K main bits keep running statistics. The auxiliary bits
    (``part="aux"``) exist only in training, so they are standardised with the statistics of
    their batch.
    Computed in float32.
    """

    scale: float = 1.0
    learn_scale: bool = False
    bit_norm: bool = False

    @nn.compact
    def __call__(self, features, train: bool = False, part: str = "main"):
        """Map features [B, Q, D] to float32 codes [B, Q] in (-1, 1).

        ``part`` ("main" or "aux") selects the bit-norm statistics. Without ``bit_norm`` it has
        no effect.
        """
        width = features.shape[-1]
        w = self.param("w", nn.initializers.normal(stddev=1.0 / math.sqrt(width)), (width,), jnp.float32)

        features = features.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
        unit = features / jnp.maximum(norm, 1e-6)
        projection = unit @ w

        if self.bit_norm:
            if part == "main":
                projection = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=BIT_NORM_EPSILON,
                    use_bias=False,
                    use_scale=False,
                    dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    name="bit_norm",
                )(projection)
            elif part == "aux":
                # Auxiliary bits exist only in training, so they are always standardised with
                # the batch statistics and keep no running averages.
                mean = jnp.mean(projection, axis=0, keepdims=True)
                variance = jnp.var(projection, axis=0, keepdims=True)
                projection = (projection - mean) * jax.lax.rsqrt(variance + BIT_NORM_EPSILON)
            else:
                raise ValueError(f"part must be 'main' or 'aux', got {part!r}.")

        scale = jnp.float32(self.scale)
        if self.learn_scale:
            log_scale = self.param(
                "log_scale", nn.initializers.constant(math.log(self.scale)), (), jnp.float32
            )
            scale = jnp.exp(log_scale)

        return jnp.tanh(scale * projection)


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------


class AttributeHashHead(nn.Module):
    """Attribute-query hashing head on a list of backbone feature maps.

    Attributes:
      code_length: K, bits of the inference code.
      width: token width d (default 384 as in the release).
      num_heads: attention heads in encoder and decoder.
      ffn_dim: hidden width of the encoder and decoder FFNs.
      encoder_layers: refine layers on the tokens (0 passes them straight through).
      decoder_layers: attribute-query decoder layers.
      query_self_attention: add self-attention among the queries (off in the release, so each
        bit is decoded independently).
      aux: train-only auxiliary bits, one of:
        - "none".
        - "pairwise": one extra bit per attribute pair (i, j) from ``pairwise_query_pairs``.
          The pair query is q_ij = (q_i + q_j) / sqrt(2), the normalised sum of the two
          attribute queries, so its attention and its decoded feature describe where and
          whether both attributes co-occur. It is decoded and compressed by the shared weights.
          ``aux_bits`` sets the number of pairs (default K).
        - "rolled": the release's form. R = max(1, aux_total_bits // K) copies of every query,
          copy i rolled circularly along the channel axis by floor(i * d / R). The R - 1 rolled
          copies give (R - 1) * K auxiliary bits. With R = 1 (K = 64 or K > aux_total_bits at
          the default 96) the branch is a no-op and a warning is logged.
      aux_bits: number of pairwise auxiliary bits (pairwise only; default K).
      aux_total_bits: target main plus rolled bits (rolled only; default 96 as in the release).
      num_classes: when > 0, a linear classifier on the continuous codes returns "logits".
      norm: "batch" or "layer" in the CNN upsampling bottleneck.
      bottleneck_width: channels of the upsampling bottleneck.
      max_grid_size: largest token grid side covered by the position tables.
      compression_scale, learn_compression_scale, bit_norm: see ``BitCompression``; the
        defaults (1.0, False, False) reproduce the release.
      feature_maps: "all" uses every backbone map (the release's two-scale fusion for a CNN);
        "last" keeps only the last map (7x7 = 49 tokens for a 224 px CNN input instead of 245),
        about five times cheaper per image, for CPU-sized runs.
      dtype: compute dtype (float32 or bfloat16); parameters stay float32 and codes, attention
        and logits are returned in float32.
    """

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

    @property
    def num_aux_bits(self) -> int:
        """A, the auxiliary bits returned in training (0 when the branch is off or a no-op)."""
        return auxiliary_bit_count(self.aux, self.code_length, self.aux_bits, self.aux_total_bits)

    @property
    def num_loss_bits(self) -> int:
        """K + A, the bits per image that the training loss takes."""
        return self.code_length + self.num_aux_bits

    def _validate_config(self) -> None:
        if self.code_length < 1:
            raise ValueError(f"code_length must be >= 1, got {self.code_length}.")
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"width={self.width} must be divisible by num_heads={self.num_heads}."
            )
        if self.encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0, got {self.encoder_layers}.")
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers must be >= 1, got {self.decoder_layers}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}.")
        if self.compression_scale <= 0:
            raise ValueError(f"compression_scale must be > 0, got {self.compression_scale}.")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}.")
        # Raises on an invalid aux, aux_bits or aux_total_bits.
        auxiliary_bit_count(self.aux, self.code_length, self.aux_bits, self.aux_total_bits)

    @staticmethod
    def _validate_feature_maps(feature_maps) -> None:
        if not isinstance(feature_maps, (list, tuple)):
            raise ValueError(
                "feature_maps must be a list of [B, h, w, C] arrays (the backbone's "
                f"'feature_maps'), got {type(feature_maps).__name__}."
            )
        if len(feature_maps) not in (1, 2):
            raise ValueError(
                f"feature_maps must contain 1 map (ViT) or 2 maps (CNN stride 16 and 32), got "
                f"{len(feature_maps)}."
            )
        for index, feature_map in enumerate(feature_maps):
            if feature_map.ndim != 4:
                raise ValueError(
                    f"feature_maps[{index}] must have shape [B, h, w, C], got {feature_map.shape}."
                )
            if not jnp.issubdtype(feature_map.dtype, jnp.floating):
                raise ValueError(
                    f"feature_maps[{index}] must be a float array, got dtype {feature_map.dtype}."
                )
        batches = {feature_map.shape[0] for feature_map in feature_maps}
        if len(batches) != 1:
            raise ValueError(
                f"feature_maps have different batch sizes {[m.shape for m in feature_maps]}."
            )
        if len(feature_maps) == 2:
            high, low = feature_maps[0].shape[1:3], feature_maps[1].shape[1:3]
            expected = tuple(-(-side // 2) for side in high)
            if tuple(low) != expected:
                raise ValueError(
                    f"feature_maps must be ordered (stride 16, stride 32) with the second grid "
                    f"ceil(h/2) x ceil(w/2) of the first, got grids {tuple(high)} and "
                    f"{tuple(low)} (expected {expected} for the second)."
                )

    def _auxiliary_queries(self, queries):
        """Return the auxiliary query vectors [A, d] derived from ``queries`` [K, d]."""
        if self.aux == "pairwise":
            pairs = pairwise_query_pairs(self.code_length, self.num_aux_bits)
            return (queries[pairs[:, 0]] + queries[pairs[:, 1]]) / math.sqrt(2.0)

        copies = rolled_copy_count(self.code_length, self.aux_total_bits)
        shifts = rolled_copy_shifts(self.width, copies)
        return jnp.concatenate([jnp.roll(queries, shift, axis=-1) for shift in shifts], axis=0)

    @nn.compact
    def __call__(self, feature_maps, train: bool, return_attention: bool = False):
        """Compute continuous codes from backbone feature maps.

        Args:
          feature_maps: list of float [B, h_i, w_i, C_i]; two maps (stride 16, stride 32) for a
            CNN or one patch-grid map for a ViT.
          train: training mode (batch statistics, auxiliary branch).
          return_attention: also return the per-bit attention maps.

        Returns:
          dict with
            "codes": float32 [B, K] in (-1, 1); the binary code is sign(codes).
            "aux_codes": float32 [B, A], only when ``train`` and A > 0.
            "attention": float32 [B, K, T], last decoder layer's cross-attention over the T
              image tokens, averaged over heads (rows sum to 1), only on request. Tokens are
              ordered scale by scale, each in row-major grid order; with feature_maps="last"
              only the last map's tokens are present.
            "logits": float32 [B, num_classes], only when ``num_classes > 0``.
        """
        self._validate_config()
        self._validate_feature_maps(feature_maps)
        feature_maps = select_feature_maps(feature_maps, self.feature_maps)

        tokens, position = SubtleFeatureExtractor(
            width=self.width,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            encoder_layers=self.encoder_layers,
            norm=self.norm,
            bottleneck_width=self.bottleneck_width,
            max_grid_size=self.max_grid_size,
            dtype=self.dtype,
            name="subtle_features",
        )(list(feature_maps), train)

        queries = self.param(
            "queries", nn.initializers.normal(stddev=1.0), (self.code_length, self.width), jnp.float32
        )
        decoder = AttributeQueryDecoder(
            num_layers=self.decoder_layers,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            self_attention=self.query_self_attention,
            dtype=self.dtype,
            name="decoder",
        )
        compression = BitCompression(
            self.compression_scale, self.learn_compression_scale, self.bit_norm, name="compression"
        )

        num_aux = self.num_aux_bits if train else 0
        if train and self.aux == "rolled" and num_aux == 0:
            _warn_once(
                f"aux='rolled' with code_length={self.code_length} and aux_total_bits="
                f"{self.aux_total_bits} gives R = 1 copy per query, so there are no auxiliary "
                "bits; training proceeds with the main bits only."
            )

        if num_aux > 0 and not self.query_self_attention:
            # Queries are decoded independently, so one pass over main and auxiliary queries
            # gives the main features that inference computes.
            all_queries = jnp.concatenate([queries, self._auxiliary_queries(queries)], axis=0)
            features, weights = decoder(all_queries, tokens, position)
            codes = compression(features[:, : self.code_length], train, "main")
            aux_codes = compression(features[:, self.code_length :], train, "aux")
            weights = weights[:, : self.code_length]
        else:
            features, weights = decoder(queries, tokens, position)
            codes = compression(features, train, "main")
            aux_codes = None
            if num_aux > 0:
                # With query self-attention the auxiliary queries attend among themselves only,
                # so the main codes are the same in training and inference.
                aux_features, _ = decoder(self._auxiliary_queries(queries), tokens, position)
                aux_codes = compression(aux_features, train, "aux")

        outputs = {"codes": codes}
        if aux_codes is not None:
            outputs["aux_codes"] = aux_codes
        if return_attention:
            outputs["attention"] = weights.astype(jnp.float32)
        if self.num_classes > 0:
            outputs["logits"] = nn.Dense(
                self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="classifier"
            )(codes)

        return outputs
