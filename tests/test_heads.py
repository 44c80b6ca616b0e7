"""Tests for the attribute-query hashing head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqhash_jax.models import heads
from aqhash_jax.models.heads import (
    AttributeHashHead,
    auxiliary_bit_count,
    pairwise_query_pairs,
    rolled_copy_count,
    rolled_copy_shifts,
)

SMALL = dict(width=32, num_heads=4, ffn_dim=64, bottleneck_width=16)


def cnn_maps(batch=2, grid=14, channels=(24, 48), seed=0):
    first, second = jax.random.split(jax.random.key(seed))
    half = (grid + 1) // 2
    return [
        jax.random.normal(first, (batch, grid, grid, channels[0])),
        jax.random.normal(second, (batch, half, half, channels[1])),
    ]


def vit_maps(batch=2, grid=6, channels=40, seed=0):
    return [jax.random.normal(jax.random.key(seed), (batch, grid, grid, channels))]


# Everything runs under jax.jit, and compiled functions and initial variables are cached per
# head configuration: on a CPU one compilation per configuration costs far less than the
# per-operation compilations of eager execution. Parameters are initialised with the
# "unsafe_rbg" PRNG, whose initialiser compiles several times faster than threefry's.
_variables_cache = {}


def init_head(head, maps):
    """Return initial variables, shared by heads that differ only in aux or dtype.

    Neither field adds parameters (test_aux_branch_has_no_parameters checks the aux part).
    """
    twin = head.clone(aux="none", aux_bits=None, dtype=jnp.float32)
    cache_key = (twin, tuple((m.shape, str(m.dtype)) for m in maps))
    if cache_key not in _variables_cache:
        init = jax.jit(lambda key, maps: twin.init(key, maps, train=False))
        _variables_cache[cache_key] = init(jax.random.key(1, impl="unsafe_rbg"), maps)
    return _variables_cache[cache_key]


@functools.lru_cache(maxsize=None)
def forward_fn(head, train, return_attention):
    def forward(variables, maps):
        if train:
            outputs, _ = head.apply(
                variables, maps, train=True, return_attention=return_attention,
                mutable=["batch_stats"],
            )
            return outputs
        return head.apply(variables, maps, train=False, return_attention=return_attention)

    return jax.jit(forward)


def run(head, variables, maps, train=False, return_attention=False):
    return forward_fn(head, train, return_attention)(variables, maps)


def trace_init(head, maps):
    """Trace the head's initialisation without compiling it (enough to reach input checks)."""
    key = jax.random.key(1, impl="unsafe_rbg")
    return jax.eval_shape(lambda key, maps: head.init(key, maps, train=False), key, maps)


def apply_train(head, variables, maps, **kwargs):
    return run(head, variables, maps, train=True, **kwargs)


def count_params(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("grid,tokens", [(14, 14 * 14 + 7 * 7), (10, 10 * 10 + 5 * 5)])
def test_head_shapes_cnn_maps(grid, tokens):
    head = AttributeHashHead(12, num_classes=5, **SMALL)
    maps = cnn_maps(grid=grid)
    variables = init_head(head, maps)

    outputs = run(head, variables, maps, return_attention=True)
    assert set(outputs) == {"codes", "attention", "logits"}
    assert outputs["codes"].shape == (2, 12)
    assert outputs["codes"].dtype == jnp.float32
    assert outputs["attention"].shape == (2, 12, tokens)
    assert outputs["logits"].shape == (2, 5)
    assert np.all(np.abs(np.asarray(outputs["codes"])) < 1.0)

    trained = apply_train(head, variables, maps)
    assert trained["codes"].shape == (2, 12)
    assert trained["aux_codes"].shape == (2, 12)


def test_head_shapes_vit_map():
    head = AttributeHashHead(16, **SMALL)
    maps = vit_maps(grid=6)
    variables = init_head(head, maps)
    assert "batch_stats" not in variables

    outputs = run(head, variables, maps, return_attention=True)
    assert outputs["codes"].shape == (2, 16)
    assert outputs["attention"].shape == (2, 16, 36)

    trained = run(head, variables, maps, train=True)
    assert trained["aux_codes"].shape == (2, 16)


def test_head_odd_grid_crops_upsampled_map():
    head = AttributeHashHead(8, **SMALL)
    maps = cnn_maps(grid=13)
    assert maps[1].shape[1:3] == (7, 7)
    variables = init_head(head, maps)
    outputs = run(head, variables, maps, return_attention=True)
    assert outputs["attention"].shape == (2, 8, 13 * 13 + 7 * 7)


def test_attention_rows_sum_to_one():
    head = AttributeHashHead(12, decoder_layers=2, **SMALL)
    maps = cnn_maps(grid=10)
    variables = init_head(head, maps)
    attention = np.asarray(run(head, variables, maps, return_attention=True)["attention"])
    np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(attention >= 0)


def test_bfloat16_compute_float32_params():
    maps = cnn_maps(grid=10)
    head32 = AttributeHashHead(12, **SMALL)
    head16 = AttributeHashHead(12, dtype=jnp.bfloat16, **SMALL)
    variables = init_head(head32, maps)
    key = jax.random.key(1, impl="unsafe_rbg")
    shapes16 = jax.eval_shape(lambda key, maps: head16.init(key, maps, train=False), key, maps)
    for leaf in jax.tree.leaves(shapes16):
        assert leaf.dtype == jnp.float32

    codes32 = run(head32, variables, maps)["codes"]
    outputs16 = run(head16, variables, maps, return_attention=True)
    assert outputs16["codes"].dtype == jnp.float32
    assert outputs16["attention"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(outputs16["codes"])))
    np.testing.assert_allclose(outputs16["attention"].sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(outputs16["codes"]), np.asarray(codes32), atol=0.1)

    trained = apply_train(head16, variables, maps)
    assert trained["aux_codes"].dtype == jnp.float32


def test_aux_branch_has_no_parameters():
    maps = cnn_maps(grid=10)
    key = jax.random.key(1, impl="unsafe_rbg")
    shapes = {}
    for aux in ("none", "pairwise", "rolled"):
        head = AttributeHashHead(12, aux=aux, **SMALL)
        shapes[aux] = jax.eval_shape(lambda key, maps: head.init(key, maps, train=False), key, maps)
    assert count_params(shapes["none"]) == count_params(shapes["pairwise"])
    assert count_params(shapes["none"]) == count_params(shapes["rolled"])
    assert jax.tree.structure(shapes["none"]) == jax.tree.structure(shapes["pairwise"])
    assert jax.tree.structure(shapes["none"]) == jax.tree.structure(shapes["rolled"])


def test_inference_jaxpr_has_no_aux_ops():
    maps = cnn_maps(grid=10)
    base = AttributeHashHead(12, aux="none", **SMALL)
    variables = init_head(base, maps)

    def jaxpr_text(head, train):
        if train:
            fn = lambda v, m: head.apply(v, m, train=True, mutable=["batch_stats"])
        else:
            fn = lambda v, m: head.apply(v, m, train=False)
        return str(jax.make_jaxpr(fn)(variables, maps))

    for aux in ("pairwise", "rolled"):
        head = AttributeHashHead(12, aux=aux, **SMALL)
        assert jaxpr_text(head, train=False) == jaxpr_text(base, train=False)
        assert len(jaxpr_text(head, train=True)) > len(jaxpr_text(base, train=True))


@pytest.mark.parametrize("code_length,expected_aux", [(12, 7 * 12), (64, 0), (128, 0)])
def test_rolled_branch_bit_counts(code_length, expected_aux):
    assert auxiliary_bit_count("rolled", code_length) == expected_aux
    head = AttributeHashHead(code_length, aux="rolled", **SMALL)
    assert head.num_aux_bits == expected_aux
    assert head.num_loss_bits == code_length + expected_aux

    maps = vit_maps(grid=4)
    outputs = run(head, init_head(head, maps), maps, train=True)
    assert outputs["codes"].shape == (2, code_length)
    if expected_aux:
        assert outputs["aux_codes"].shape == (2, expected_aux)
    else:
        assert "aux_codes" not in outputs


def test_rolled_bit_counts_between():
    assert auxiliary_bit_count("rolled", 32) == 2 * 32
    assert auxiliary_bit_count("rolled", 48) == 48
    assert auxiliary_bit_count("rolled", 96) == 0
    assert auxiliary_bit_count("rolled", 97) == 0
    assert auxiliary_bit_count("none", 12) == 0
    assert auxiliary_bit_count("pairwise", 12) == 12
    assert auxiliary_bit_count("pairwise", 12, aux_bits=30) == 30


def test_rolled_branch_no_op_logs_warning(monkeypatch):
    messages = []
    monkeypatch.setattr(heads, "_warned_messages", set())
    monkeypatch.setattr(heads.logging, "warning", lambda message: messages.append(message))
    head = AttributeHashHead(64, aux="rolled", **SMALL)
    maps = vit_maps(grid=4)
    variables = init_head(head, maps)
    jax.eval_shape(lambda v, m: head.apply(v, m, train=True), variables, maps)
    assert len(messages) == 1
    assert "no auxiliary bits" in messages[0]


def test_rolled_total_bits_configurable():
    assert rolled_copy_count(12, aux_total_bits=48) == 4
    assert auxiliary_bit_count("rolled", 12, aux_total_bits=48) == 36
    assert rolled_copy_shifts(32, 4) == [8, 16, 24]


def test_rolled_copies_decode_rolled_queries():
    """Copy i of the rolled branch equals the main decoding with queries rolled by i*d/R."""
    head = AttributeHashHead(12, aux="rolled", aux_total_bits=36, **SMALL)
    maps = vit_maps(grid=4)
    variables = init_head(head, maps)
    aux_codes = np.asarray(run(head, variables, maps, train=True)["aux_codes"])
    assert aux_codes.shape == (2, 24)

    queries = variables["params"]["queries"]
    for copy, shift in enumerate(rolled_copy_shifts(32, 3)):
        rolled = jax.tree.map(lambda x: x, variables)
        rolled["params"]["queries"] = jnp.roll(queries, shift, axis=-1)
        expected = np.asarray(run(head, rolled, maps)["codes"])
        np.testing.assert_allclose(aux_codes[:, copy * 12 : (copy + 1) * 12], expected, atol=1e-5)


def test_pairwise_pairs_distinct_and_deterministic():
    pairs = pairwise_query_pairs(6, 15)
    unordered = {tuple(sorted(pair)) for pair in pairs.tolist()}
    assert len(unordered) == 15
    assert all(i != j for i, j in pairs.tolist())
    np.testing.assert_array_equal(pairwise_query_pairs(6, 6)[:, 1], (np.arange(6) + 1) % 6)
    np.testing.assert_array_equal(pairwise_query_pairs(6, 15), pairs)
    with pytest.raises(ValueError, match="aux_bits=16"):
        pairwise_query_pairs(6, 16)


def test_pairwise_codes_decode_pair_queries():
    head = AttributeHashHead(8, aux="pairwise", aux_bits=10, **SMALL)
    maps = vit_maps(grid=4)
    variables = init_head(head, maps)
    aux_codes = np.asarray(run(head, variables, maps, train=True)["aux_codes"])
    assert aux_codes.shape == (2, 10)

    queries = variables["params"]["queries"]
    pairs = pairwise_query_pairs(8, 10)
    pair_queries = (queries[pairs[:, 0]] + queries[pairs[:, 1]]) / np.sqrt(2.0)
    pair_head = AttributeHashHead(10, aux="none", **SMALL)
    pair_variables = jax.tree.map(lambda x: x, variables)
    pair_variables["params"]["queries"] = pair_queries
    expected = np.asarray(run(pair_head, pair_variables, maps)["codes"])
    np.testing.assert_allclose(aux_codes, expected, atol=1e-5)


def test_main_codes_same_in_train_and_inference():
    maps = vit_maps(grid=4)
    for self_attention in (False, True):
        head = AttributeHashHead(8, aux="pairwise", query_self_attention=self_attention, **SMALL)
        variables = init_head(head, maps)
        inference = np.asarray(run(head, variables, maps)["codes"])
        training = np.asarray(run(head, variables, maps, train=True)["codes"])
        np.testing.assert_allclose(training, inference, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        dict(encoder_layers=0),
        dict(encoder_layers=2, decoder_layers=2, query_self_attention=True),
        dict(norm="layer"),
        dict(learn_compression_scale=True, compression_scale=3.0),
    ],
    ids=["no_encoder", "deeper_self_attention", "layer_norm", "learned_scale"],
)
def test_config_variant_runs(variant):
    maps = cnn_maps(grid=10)
    head = AttributeHashHead(8, **SMALL, **variant)
    # One compilation: initialise and run the training forward pass together.
    init_and_run = jax.jit(
        lambda key, maps: head.init_with_output(key, maps, train=True, return_attention=True)
    )
    outputs, variables = init_and_run(jax.random.key(1, impl="unsafe_rbg"), maps)
    assert outputs["codes"].shape == (2, 8)
    assert outputs["aux_codes"].shape == (2, 8)
    assert outputs["attention"].shape == (2, 8, 125)
    assert np.all(np.isfinite(np.asarray(outputs["codes"])))
    if variant.get("norm") == "layer":
        assert "batch_stats" not in variables
    if variant.get("learn_compression_scale"):
        log_scale = variables["params"]["compression"]["log_scale"]
        np.testing.assert_allclose(float(log_scale), np.log(3.0), rtol=1e-6)


def test_bit_norm_balances_every_bit_in_training():
    # Without bit_norm a fresh head gives nearly the same code to every image. With it each bit
    # is standardised over the batch, so every main and auxiliary bit splits the batch.
    maps = vit_maps(batch=16, grid=4, seed=3)
    plain = AttributeHashHead(8, aux="pairwise", **SMALL)
    normed = AttributeHashHead(8, aux="pairwise", bit_norm=True, **SMALL)
    variables = jax.jit(lambda key, maps: normed.init(key, maps, train=False))(
        jax.random.key(1, impl="unsafe_rbg"), maps
    )
    assert set(variables["batch_stats"]["compression"]) == {"bit_norm"}
    assert variables["batch_stats"]["compression"]["bit_norm"]["mean"].shape == (8,)

    outputs = run(normed, variables, maps, train=True)
    for name in ("codes", "aux_codes"):
        codes = np.asarray(outputs[name])
        assert codes.shape == (16, 8)
        np.testing.assert_allclose(np.arctanh(codes).mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(np.arctanh(codes).std(axis=0), 1.0, atol=1e-2)
        assert np.all(np.abs((codes > 0).mean(axis=0) - 0.5) < 0.5), name

    plain_variables = {"params": variables["params"]}
    plain_codes = np.asarray(run(plain, plain_variables, maps)["codes"])
    normed_spread = np.arctanh(np.asarray(outputs["codes"])).std(axis=0)
    assert np.all(plain_codes.std(axis=0) < 0.2 * normed_spread)


def test_bit_norm_inference_uses_running_statistics():
    maps = vit_maps(batch=8, grid=4, seed=4)
    head = AttributeHashHead(8, aux="none", bit_norm=True, compression_scale=2.0, **SMALL)
    variables = jax.jit(lambda key, maps: head.init(key, maps, train=False))(
        jax.random.key(1, impl="unsafe_rbg"), maps
    )
    stats = variables["batch_stats"]["compression"]["bit_norm"]
    shifted = {
        "params": variables["params"],
        "batch_stats": {"compression": {"bit_norm": {"mean": stats["mean"] + 0.01, "var": stats["var"] * 4.0}}},
    }
    plain = AttributeHashHead(8, aux="none", compression_scale=2.0, **SMALL)
    projection = np.arctanh(np.asarray(run(plain, {"params": variables["params"]}, maps)["codes"])) / 2.0
    expected = np.tanh(2.0 * (projection - 0.01) / np.sqrt(4.0 * np.asarray(stats["var"]) + 1e-5))
    codes = np.asarray(run(head, shifted, maps)["codes"])
    np.testing.assert_allclose(codes, expected, atol=2e-4)

    # A batch of one image codes the same alone as inside a larger batch.
    single = np.asarray(run(head, shifted, [maps[0][:1]])["codes"])
    np.testing.assert_allclose(single, codes[:1], atol=1e-5)


def test_last_feature_map_only():
    maps = cnn_maps(grid=10)
    last = AttributeHashHead(8, aux="none", feature_maps="last", **SMALL)
    variables = jax.jit(lambda key, maps: last.init(key, maps, train=False))(
        jax.random.key(1, impl="unsafe_rbg"), maps
    )
    subtle = variables["params"]["subtle_features"]
    assert "top_down_reduce" not in subtle
    assert "project_1" not in subtle

    outputs = run(last, variables, maps, return_attention=True)
    assert outputs["attention"].shape == (2, 8, 25)

    # The same as a one-map head given the stride-32 map alone.
    alone = AttributeHashHead(8, aux="none", **SMALL)
    expected = run(alone, variables, maps[1:], return_attention=True)
    np.testing.assert_allclose(np.asarray(outputs["codes"]), np.asarray(expected["codes"]), atol=1e-6)

    with pytest.raises(ValueError, match="feature_maps must be one of"):
        trace_init(AttributeHashHead(8, feature_maps="first", **SMALL), maps)


def test_fixed_compression_scale_sharpens_codes():
    maps = vit_maps(grid=4)
    head1 = AttributeHashHead(8, **SMALL)
    head4 = AttributeHashHead(8, compression_scale=4.0, **SMALL)
    variables = init_head(head1, maps)
    codes1 = np.asarray(run(head1, variables, maps)["codes"])
    codes4 = np.asarray(run(head4, variables, maps)["codes"])
    np.testing.assert_allclose(np.arctanh(codes4), 4.0 * np.arctanh(codes1), rtol=1e-3, atol=1e-4)


def test_gradients_finite():
    head = AttributeHashHead(12, aux="rolled", aux_total_bits=24, num_classes=3, **SMALL)
    maps = cnn_maps(grid=10)
    variables = init_head(head, maps)

    def objective(params):
        outputs = apply_train(head, {**variables, "params": params}, maps)
        return (
            jnp.sum(outputs["codes"] ** 2)
            + jnp.sum(outputs["aux_codes"] ** 2)
            + jnp.sum(outputs["logits"] ** 2)
        )

    grads = jax.jit(jax.grad(objective))(variables["params"])
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.any(np.asarray(grads["queries"]) != 0)
    assert np.any(np.asarray(grads["subtle_features"]["top_down_upsample"]["kernel"]) != 0)


def test_invalid_inputs_raise():
    head = AttributeHashHead(8, **SMALL)
    maps = cnn_maps(grid=10)
    with pytest.raises(ValueError, match="1 map"):
        trace_init(head, maps + maps[:1])
    with pytest.raises(ValueError, match="shape"):
        trace_init(head, [maps[0][0]])
    with pytest.raises(ValueError, match="batch sizes"):
        trace_init(head, [maps[0], maps[1][:1]])
    with pytest.raises(ValueError, match="ordered"):
        trace_init(head, [maps[1], maps[0]])
    with pytest.raises(ValueError, match="ordered"):
        trace_init(head, [maps[0], maps[0]])
    with pytest.raises(ValueError, match="list"):
        trace_init(head, maps[0])
    with pytest.raises(ValueError, match="max_grid_size"):
        trace_init(AttributeHashHead(8, max_grid_size=8, **SMALL), maps)
    with pytest.raises(ValueError, match="aux_bits"):
        trace_init(AttributeHashHead(4, aux_bits=7, **SMALL), maps)
    with pytest.raises(ValueError, match="aux_bits"):
        trace_init(AttributeHashHead(4, aux="rolled", aux_bits=4, **SMALL), maps)
    with pytest.raises(ValueError, match="aux must be"):
        trace_init(AttributeHashHead(4, aux="triple", **SMALL), maps)
    with pytest.raises(ValueError, match="divisible"):
        trace_init(AttributeHashHead(4, width=30, num_heads=4), maps)
    with pytest.raises(ValueError, match="norm"):
        trace_init(AttributeHashHead(4, norm="group", **SMALL), maps)
