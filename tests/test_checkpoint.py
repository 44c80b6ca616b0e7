"""Tests of the orbax checkpoint wrapper: round trip, no overwrite, retention, iterator state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqhash_jax.training.checkpoint import (
    Checkpointer,
    abstract_like,
    decode_iterator_state,
    encode_iterator_state,
)
from aqhash_jax.training.state import TrainState


def make_state(value: float) -> TrainState:
    params = {"head": {"queries": jnp.full((3, 4), value)}}
    optimizer = optax.sgd(0.1, momentum=0.9)
    return TrainState(
        step=jnp.asarray(int(value), jnp.int32),
        params=params,
        batch_stats={"head": {"mean": jnp.zeros(4)}},
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(0),
        code_matrix=jnp.where(jnp.arange(12).reshape(6, 2) % 3 == 0, 1, -1).astype(jnp.int8),
        sample_codes=jnp.full((5, 2), value / 10),
    )


def test_round_trip(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", max_to_keep=3)
    state = make_state(7.0)
    iterator_state = encode_iterator_state(b"\x00grain state\xff")
    checkpointer.save(7, state, {"step": 7, "iterator_state": iterator_state})

    restored, metadata = checkpointer.restore(7, abstract_like(make_state(0.0)))
    checkpointer.close()
    for before, after in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
        assert np.asarray(before).dtype == np.asarray(after).dtype
    assert metadata["step"] == 7
    assert decode_iterator_state(metadata["iterator_state"]) == b"\x00grain state\xff"


def test_relative_directory_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpointer = Checkpointer("run/checkpoints", max_to_keep=3)

    assert checkpointer.directory == tmp_path / "run" / "checkpoints"
    assert checkpointer.save(3, make_state(3.0), {"step": 3})
    restored, metadata = checkpointer.restore(3, abstract_like(make_state(0.0)))
    checkpointer.close()

    np.testing.assert_array_equal(np.asarray(restored.params["head"]["queries"]), 3.0)
    assert metadata["step"] == 3
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_existing_step_not_overwritten(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=3)
    assert checkpointer.save(5, make_state(5.0), {"step": 5})
    assert not checkpointer.save(5, make_state(9.0), {"step": 5})
    restored, _ = checkpointer.restore(5, abstract_like(make_state(0.0)))
    checkpointer.close()
    np.testing.assert_array_equal(np.asarray(restored.params["head"]["queries"]), 5.0)


def test_keeps_latest(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, make_state(float(step)), {"step": step})
    assert checkpointer.all_steps() == [2, 3]
    assert checkpointer.latest_step() == 3
    checkpointer.close()


def test_dict_iterator_state_passes_through():
    state = {"next_index": 3, "epoch": 1}
    assert decode_iterator_state(encode_iterator_state(state)) == state
