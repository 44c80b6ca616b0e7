"""Tests for the full hashing model, its config builder and end-to-end overfitting."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aqhash_jax import losses
from aqhash_jax.models.hashing import HashModel, build_model, join_params, split_params

TINY_HEAD = dict(width=16, num_heads=2, ffn_dim=32, bottleneck_width=8)
TINY_VIT = dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64)

HAS_BACKBONES = importlib.util.find_spec("aqhash_jax.models.backbones") is not None


def head_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            backbone=None,
            code_length=12,
            width=16,
            num_heads=2,
            ffn_dim=32,
            encoder_layers=1,
            decoder_layers=1,
            query_self_attention=False,
            aux="pairwise",
            aux_bits=4,
            aux_total_bits=96,
            num_classes=0,
            dtype="float32",
            conv_impl="auto",
            image_size=32,
            bottleneck_width=8,
        )
    )
    config.update(overrides)
    return config


def init_from_features(model, maps):
    init = jax.jit(
        lambda key: model.init(key, maps, train=False, method=HashModel.from_features)
    )
    return init(jax.random.key(0, impl="unsafe_rbg"))


def test_build_model_reads_config():
    model = build_model(head_config(num_classes=4, dtype="bfloat16", aux="rolled", aux_bits=None))
    assert model.backbone_name is None
    assert model.code_length == 12
    assert model.width == 16
    assert model.aux == "rolled"
    assert model.num_classes == 4
    assert model.dtype == jnp.bfloat16
    assert model.num_loss_bits == 96

    assert build_model(head_config()).num_loss_bits == 16
    with pytest.raises(ValueError, match="dtype"):
        build_model(head_config(dtype="float16"))
    with pytest.raises(ValueError, match="code_length"):
        build_model(ml_collections.ConfigDict(dict(backbone=None)))


def test_head_only_model_on_cnn_features():
    model = build_model(head_config(num_classes=3))
    maps = [jnp.ones((2, 10, 10, 12)), jnp.ones((2, 5, 5, 20))]
    variables = init_from_features(model, maps)
    assert set(variables["params"]) == {"head"}
    assert set(variables["batch_stats"]) == {"head"}

    apply = jax.jit(
        lambda v, m: model.apply(
            v, m, train=True, return_attention=True,
            method=HashModel.from_features, mutable=["batch_stats"],
        )[0]
    )
    outputs = apply(variables, maps)
    assert outputs["codes"].shape == (2, 12)
    assert outputs["aux_codes"].shape == (2, 4)
    assert outputs["attention"].shape == (2, 12, 125)
    assert outputs["logits"].shape == (2, 3)
    assert losses.loss_codes(outputs).shape == (2, 16)

    with pytest.raises(ValueError, match="from_features"):
        model.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)


def test_split_and_join_params_round_trip():
    variables = {
        "params": {"backbone": {"conv": {"kernel": np.ones(3)}}, "head": {"queries": np.zeros(2)}},
        "batch_stats": {"backbone": {"bn": {"mean": np.ones(1)}}},
    }
    backbone_variables, head_variables = split_params(variables)
    assert set(backbone_variables) == {"params", "batch_stats"}
    assert set(head_variables) == {"params"}
    assert set(head_variables["params"]) == {"queries"}
    joined = join_params(backbone_variables, head_variables)
    assert jax.tree.structure(joined) == jax.tree.structure(variables)

    with pytest.raises(ValueError, match="unexpected"):
        split_params({"params": {"encoder": {}}})


@pytest.mark.skipif(not HAS_BACKBONES, reason="aqhash_jax.models.backbones is not available")
def test_full_model_with_tiny_vit():
    head_kwargs = dict(aux="rolled", aux_total_bits=24, **TINY_HEAD)
    model = HashModel("vit_ti16", 8, image_size=32, backbone_kwargs=TINY_VIT, **head_kwargs)
    head_model = HashModel(None, 8, **head_kwargs)
    assert model.num_loss_bits == 24

    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(lambda key: model.init(key, images, train=False))(
        jax.random.key(0, impl="unsafe_rbg")
    )
    assert set(variables["params"]) == {"backbone", "head"}
    backbone_variables, head_variables = split_params(variables)

    @jax.jit
    def encode_both_ways(variables, images):
        outputs = model.apply(variables, images, train=False, return_attention=True)
        feature_maps = model.apply(
            variables, images, method=lambda module, x: module.backbone(x, train=False)
        )["feature_maps"]
        # The head alone, on the backbone's feature maps and with only the head variables.
        head_outputs = head_model.apply(
            join_params({}, head_variables), feature_maps, train=False,
            method=HashModel.from_features,
        )
        return outputs, head_outputs

    outputs, head_outputs = encode_both_ways(variables, images)
    assert outputs["codes"].shape == (2, 8)
    assert outputs["attention"].shape == (2, 8, 4)
    assert outputs["pooled"].shape == (2, 32)
    assert "aux_codes" not in outputs
    np.testing.assert_allclose(
        np.asarray(head_outputs["codes"]), np.asarray(outputs["codes"]), atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Overfitting eight examples of four classes
# ---------------------------------------------------------------------------------------------


def class_features(seed=0):
    """Return ViT-style feature maps [8, 4, 4, 16] (class pattern plus noise) and labels [8]."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 2).astype(np.int32)
    patterns = rng.standard_normal((4, 4, 4, 16))
    features = patterns[labels] + 0.3 * rng.standard_normal((8, 4, 4, 16))
    return [jnp.asarray(features, jnp.float32)], labels


def assert_perfect_retrieval(codes, labels):
    signs = np.where(np.asarray(codes) >= 0, 1, -1)
    for first in range(len(labels)):
        for second in range(len(labels)):
            same_code = np.array_equal(signs[first], signs[second])
            if labels[first] == labels[second]:
                assert same_code, f"items {first} and {second} share class {labels[first]} but not a code"
            else:
                assert not same_code, f"items {first} and {second} differ in class but share a code"


def make_training(model, maps, learning_rate):
    variables = init_from_features(model, maps)
    optimizer = optax.adam(learning_rate)

    def forward(params, train):
        return model.apply({"params": params}, maps, train=train, method=HashModel.from_features)

    encode = jax.jit(lambda params: forward(params, False)["codes"])
    return variables["params"], optimizer, forward, encode


@pytest.mark.parametrize("form,quantization_weight", [("pairwise_mse", 0.1), ("dpsh", 0.5)])
def test_overfit_symmetric_objective(form, quantization_weight):
    maps, labels = class_features()
    model = build_model(head_config())
    params, optimizer, forward, encode = make_training(model, maps, learning_rate=3e-3)

    def objective(params):
        codes = losses.loss_codes(forward(params, True))
        return losses.symmetric_loss(
            codes, labels, similarity_weight=1.0, quantization_weight=quantization_weight, form=form
        )

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(objective)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, grads)

        carry = (params, optimizer.init(params))
        (params, _), (loss_history, grads) = jax.lax.scan(step, carry, None, length=400)
        return params, loss_history, grads

    params, loss_history, grads = train(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(loss_history[-1]) < 0.5 * float(loss_history[0])
    assert_perfect_retrieval(encode(params), labels)


@pytest.mark.slow
def test_overfit_adsh_objective():
    maps, labels = class_features(seed=1)
    model = build_model(head_config(aux="rolled", aux_bits=None, aux_total_bits=24))
    assert model.num_loss_bits == 24
    params, optimizer, forward, encode = make_training(model, maps, learning_rate=3e-3)

    indices = np.arange(8, dtype=np.int32)
    # The release's gamma = 200 balances c * S^T U summed over about |M| / classes similar
    # sampled images per database row (2000 / 200 = 10 on CUB). With two images per class here,
    # a large gamma ties every row of B to its own start, so gamma is scaled down.
    gamma = 1.0

    def objective(params, code_matrix):
        codes = losses.loss_codes(forward(params, True))
        loss = losses.adsh_loss(codes, labels, indices, code_matrix, labels, gamma, num_sampled=8)
        return loss, codes

    @jax.jit
    def train_outer_iteration(params, opt_state, code_matrix):
        def step(carry, _):
            params, opt_state = carry
            (loss, codes), grads = jax.value_and_grad(objective, has_aux=True)(params, code_matrix)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, codes, grads)

        (params, opt_state), (loss, codes, grads) = jax.lax.scan(
            step, (params, opt_state), None, length=50
        )
        # As in the release, U contains the outputs recorded during the outer iteration's
        # training steps (here those of its last step).
        return params, opt_state, loss[-1], codes[-1], grads

    # B starts from one DCC sweep of the untrained network's outputs against B = 0.
    initial_outputs = jax.jit(lambda params: losses.loss_codes(forward(params, True)))(params)
    code_matrix = losses.adsh_dcc_update(
        np.zeros((8, 24), np.float32), initial_outputs, indices, labels, labels, gamma
    ).astype(jnp.int8)

    opt_state = optimizer.init(params)
    for _ in range(4):
        params, opt_state, loss, outputs, grads = train_outer_iteration(params, opt_state, code_matrix)
        before = float(losses.adsh_objective(outputs, code_matrix, indices, labels, labels, gamma))
        code_matrix = losses.adsh_dcc_update(code_matrix, outputs, indices, labels, labels, gamma)
        after = float(losses.adsh_objective(outputs, code_matrix, indices, labels, labels, gamma))
        assert after <= before * (1 + 1e-6) + 1e-3

    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert np.isfinite(float(loss))
    assert_perfect_retrieval(encode(params), labels)
    assert_perfect_retrieval(np.asarray(code_matrix, np.float32)[:, :12], labels)
