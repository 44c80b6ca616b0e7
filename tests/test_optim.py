"""Tests of the optimiser: parameter labels, per-group learning rates, frozen stages, schedules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aqhash_jax.training.optim import (
    backbone_stage,
    make_optimizer,
    make_schedule,
    param_labels,
)


def optim_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        "name": "sgd", "learning_rate": 0.1, "backbone_lr_multiplier": 0.5, "momentum": 0.0,
        "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0, "step_boundaries": (),
        "decay_factor": 0.1, "clip_norm": 0.0, "frozen_backbone_stages": 2, "freeze_backbone": False,
    })
    config.update(overrides)
    return config


def resnet_like_params() -> dict:
    ones = lambda: {"kernel": jnp.ones((2, 2))}
    return {
        "backbone": {"conv1": ones(), "bn1": {"scale": jnp.ones(2)}, "layer1_0": ones(),
                     "layer2_0": ones(), "layer4_2": ones()},
        "head": {"queries": jnp.ones((3, 2)), "decoder": ones()},
    }


def test_labels_freeze_stem_and_first_stage():
    labels = param_labels(resnet_like_params(), freeze_backbone=False, frozen_backbone_stages=2)
    assert labels["backbone"]["conv1"]["kernel"] == "frozen"
    assert labels["backbone"]["bn1"]["scale"] == "frozen"
    assert labels["backbone"]["layer1_0"]["kernel"] == "frozen"
    assert labels["backbone"]["layer2_0"]["kernel"] == "backbone"
    assert labels["backbone"]["layer4_2"]["kernel"] == "backbone"
    assert labels["head"]["queries"] == "head"


def test_labels_freeze_whole_backbone():
    labels = param_labels(resnet_like_params(), freeze_backbone=True, frozen_backbone_stages=0)
    assert labels["backbone"]["layer4_2"]["kernel"] == "frozen"
    assert labels["head"]["decoder"]["kernel"] == "head"


def test_labels_reject_unknown_module():
    params = {"backbone": {"mystery": {"kernel": jnp.ones(2)}}, "head": {}}
    with pytest.raises(ValueError, match="frozen_backbone_stages=1"):
        param_labels(params, freeze_backbone=False, frozen_backbone_stages=1)


def test_stage_names_of_each_family():
    assert backbone_stage(("stem_conv",), "efficientnet_lite0") == 0
    assert backbone_stage(("blocks_0",), "efficientnet_lite0") == 1
    assert backbone_stage(("blocks_1",), "efficientnet_lite0") == 2
    assert backbone_stage(("blocks_15",), "efficientnet_lite0") == 7
    assert backbone_stage(("head_conv",), "efficientnet_lite0") > 7
    assert backbone_stage(("embedding",), "vit_b16") == 0
    assert backbone_stage(("Transformer", "posembed_input"), "vit_b16") == 0
    assert backbone_stage(("Transformer", "encoderblock_0"), "vit_b16") == 1
    assert backbone_stage(("layer3_5",), "resnet50") == 3


def test_group_learning_rates_and_zero_updates():
    params = resnet_like_params()
    optimizer, _ = make_optimizer(optim_config(), params, total_steps=10)
    state = optimizer.init(params)
    grads = jax_tree_full_like(params, 2.0)
    updates, _ = optimizer.update(grads, state, params)

    np.testing.assert_allclose(updates["head"]["queries"], -0.1 * 2.0)
    np.testing.assert_allclose(updates["backbone"]["layer2_0"]["kernel"], -0.1 * 0.5 * 2.0)
    np.testing.assert_array_equal(updates["backbone"]["conv1"]["kernel"], 0.0)
    np.testing.assert_array_equal(updates["backbone"]["layer1_0"]["kernel"], 0.0)


def test_frozen_params_ignore_weight_decay_and_momentum():
    params = resnet_like_params()
    optimizer, _ = make_optimizer(
        optim_config(momentum=0.9, weight_decay=0.1, name="sgd"), params, total_steps=10
    )
    state = optimizer.init(params)
    for _ in range(3):
        updates, state = optimizer.update(jax_tree_full_like(params, 1.0), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"], 1.0)
    assert float(params["backbone"]["layer2_0"]["kernel"][0, 0]) < 1.0


def test_clipping_ignores_frozen_gradients():
    params = resnet_like_params()
    optimizer, _ = make_optimizer(
        optim_config(clip_norm=1.0, freeze_backbone=True), params, total_steps=10
    )
    grads = jax_tree_full_like(params, 0.0)
    grads["backbone"]["conv1"]["kernel"] = jnp.full((2, 2), 100.0)
    grads["head"]["queries"] = jnp.full((3, 2), 0.1)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # The head gradient (norm < 1) is not scaled down by the large frozen gradient.
    np.testing.assert_allclose(updates["head"]["queries"], -0.1 * 0.1, rtol=1e-6)


def test_adamw_runs():
    params = resnet_like_params()
    optimizer, _ = make_optimizer(optim_config(name="adamw", weight_decay=0.01), params, total_steps=10)
    updates, _ = optimizer.update(jax_tree_full_like(params, 1.0), optimizer.init(params), params)
    assert float(jnp.abs(updates["head"]["queries"]).max()) > 0
    np.testing.assert_array_equal(updates["backbone"]["bn1"]["scale"], 0.0)


def test_schedules():
    cosine = make_schedule(optim_config(schedule="cosine", warmup_steps=10), 110, 1)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)

    step = make_schedule(optim_config(schedule="step", step_boundaries=(-3,)), 100, 10)
    assert float(step(29)) == pytest.approx(0.1)
    assert float(step(30)) == pytest.approx(0.01)

    with pytest.raises(ValueError, match="linear"):
        make_schedule(optim_config(schedule="linear"), 10, 1)


def jax_tree_full_like(tree, value):
    import jax

    return jax.tree_util.tree_map(lambda x: jnp.full_like(x, value), tree)
