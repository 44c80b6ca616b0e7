"""Train state and the jitted train step.

`params` and `batch_stats` keep the layout of `HashModel` variables (`{"backbone": ..., "head": ...}`).
In features mode the backbone is frozen and its features come from the cache, so the state contains
the "head" subtree only. The ADSH code matrix B and the outputs U of the current outer iteration's
sampled images live in the state, so checkpoints restore them with the network.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aqhash_jax import hash_centers, losses
from aqhash_jax.models.hashing import HashModel


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator position.

    Attributes:
      step: int32 scalar, train steps taken.
      params: float32 parameter tree in `HashModel` layout.
      batch_stats: batch-norm statistics in `HashModel` layout (may be empty).
      opt_state: optax state for `params`.
      rng: uint32 [2] PRNG key; each step folds in the step number.
      code_matrix: int8 [n_train, c] ADSH database codes B in {-1, +1}, c = K + A
        (shape [0, c] for the symmetric objective).
      sample_codes: float32 [num_samples, c], network outputs U of the sampled images of the
        current outer iteration, written by the train steps and read by the DCC update.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    code_matrix: jax.Array
    sample_codes: jax.Array


def apply_model(
    model: HashModel,
    params: Any,
    batch_stats: Any,
    inputs: Any,
    *,
    from_features: bool,
    train: bool,
) -> tuple[dict, Any]:
    """Run the model on images (float [b, H, W, 3]) or on cached feature maps (list of [b, h, w, C]).

    Returns the output dict and the updated batch statistics (unchanged when `train` is False).
    """
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    method = HashModel.from_features if from_features else None
    if train:
        outputs, mutated = model.apply(
            variables, inputs, train=True, method=method, mutable=["batch_stats"]
        )
        return outputs, mutated.get("batch_stats", batch_stats)
    outputs = model.apply(variables, inputs, train=False, method=method)
    return outputs, batch_stats


@functools.lru_cache(maxsize=8)
def _centers_for(num_classes: int, code_length: int, aux_bits: int, seed: int) -> np.ndarray:
    main = hash_centers.make_hash_centers(num_classes, code_length, seed=seed)
    if aux_bits == 0:
        return main.astype(np.float32)
    aux = hash_centers.make_hash_centers(num_classes, aux_bits, seed=seed + 1)
    return np.concatenate([main, aux], axis=1).astype(np.float32)


def _class_centers(loss_config: dict, outputs: dict) -> np.ndarray:
    """Class centres [num_classes, K + A]: separate centre sets for the main and auxiliary bits,
    so the K bits kept at inference are well separated on their own."""
    code_length = outputs["codes"].shape[-1]
    aux_bits = outputs["aux_codes"].shape[-1] if outputs.get("aux_codes") is not None else 0
    return _centers_for(int(loss_config["num_classes"]), code_length, aux_bits, int(loss_config.get("seed", 0)))


def compute_loss(
    outputs: dict,
    batch: dict,
    code_matrix: jax.Array,
    train_labels: jax.Array,
    loss_config: Any,
    num_samples: int,
) -> tuple[jax.Array, dict]:
    """Return the total loss and its terms for one batch.

    `loss_config` is `config.loss` as a plain dict. `train_labels` int [n_train] labels the rows
    of `code_matrix` (ADSH); `num_samples` is |M| of the ADSH normaliser.
    """
    codes = losses.loss_codes(outputs)
    terms = {}
    if loss_config["objective"] == "adsh":
        terms["adsh"] = losses.adsh_loss(
            codes,
            batch["label"],
            batch["index"],
            code_matrix,
            train_labels,
            gamma=float(loss_config["gamma"]),
            num_sampled=num_samples,
        )
    else:
        terms["symmetric"] = losses.symmetric_loss(
            codes,
            batch["label"],
            similarity_weight=float(loss_config["similarity_weight"]),
            quantization_weight=float(loss_config["quantization_weight"]),
            form=loss_config["symmetric_form"],
            centers=_class_centers(loss_config, outputs) if loss_config["symmetric_form"] == "centers" else None,
        )

    classification_weight = float(loss_config["classification_weight"])
    if classification_weight > 0:
        terms["classification"] = classification_weight * losses.classification_loss(
            outputs["logits"], batch["label"]
        )

    total = sum(terms.values())
    return total, terms


def make_train_step(
    model: HashModel,
    optimizer: optax.GradientTransformation,
    loss_config: dict,
    *,
    from_features: bool,
    num_samples: int,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Build the (un-jitted) train step `step(state, batch, train_labels) -> (state, metrics)`.

    `batch` contains "inputs" (images or a list of feature maps), "label" int32 [b], "index" int32 [b]
    (row in the training split) and "sample_position" int32 [b] (row in U, ADSH only).
    """

    def loss_fn(params, state, batch, train_labels):
        outputs, new_batch_stats = apply_model(
            model, params, state.batch_stats, batch["inputs"], from_features=from_features, train=True
        )
        total, terms = compute_loss(
            outputs, batch, state.code_matrix, train_labels, loss_config, num_samples
        )
        return total, (terms, new_batch_stats, losses.loss_codes(outputs))

    def train_step(state: TrainState, batch: dict, train_labels: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (terms, new_batch_stats, codes)), grads = grad_fn(
            state.params, state, batch, train_labels
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        sample_codes = state.sample_codes
        if loss_config["objective"] == "adsh":
            sample_codes = sample_codes.at[batch["sample_position"]].set(
                jax.lax.stop_gradient(codes).astype(jnp.float32)
            )

        metrics = {"loss": total, "grad_norm": optax.tree.norm(grads)}
        metrics.update({f"loss_{name}": value for name, value in terms.items()})
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_batch_stats,
            opt_state=opt_state,
            sample_codes=sample_codes,
        )
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, state_sharding: Any, batch_sharding: Any, replicated: Any) -> Callable:
    """Jit the train step over the mesh, donating the train state buffers."""
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


@functools.partial(jax.jit, static_argnames=("gamma",))
def _dcc_update(code_matrix, sample_codes, sample_indices, sample_labels, train_labels, gamma):
    updated = losses.adsh_dcc_update(
        code_matrix, sample_codes, sample_indices, sample_labels, train_labels, gamma
    )
    return updated


def dcc_update(state: TrainState, sample_indices: jax.Array, sample_labels: jax.Array,
               train_labels: jax.Array, gamma: float) -> TrainState:
    """Update B by one DCC sweep from the sampled images' outputs U (end of an outer iteration)."""
    code_matrix = _dcc_update(
        state.code_matrix, state.sample_codes, sample_indices, sample_labels, train_labels, float(gamma)
    )
    return state.replace(code_matrix=code_matrix)
