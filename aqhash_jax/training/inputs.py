"""Batches for the train step and for encoding, from the feature cache or from images.

Both sources give the same step plan: an ADSH outer iteration streams `epochs_per_iteration`
shuffled passes over its sampled images, cut into whole global batches, and the symmetric
objective streams shuffled passes over the training split. In features mode the plan is computed
on the host from the step number alone, so a resumed run needs no iterator state. In end-to-end
mode the data pipeline's grain loaders yield the batches, and their iterator state goes into the
checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from aqhash_jax.data import pipeline
from aqhash_jax.data.sources import ImageSplit
from aqhash_jax.training import mesh as mesh_lib
from aqhash_jax.training.feature_cache import FeatureCache

# Salts that keep the random streams of sampling, shuffling and view choice independent.
_SAMPLE_SALT = 101
_SHUFFLE_SALT = 202
_VIEW_SALT = 303


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Mapping of global train steps to outer iterations.

    Attributes:
      objective: "adsh" or "symmetric".
      num_train: images in the training split.
      population: images one iteration streams over (|M| for ADSH, num_train otherwise).
      epochs_per_iteration: passes over `population` per iteration (None: endless stream).
      steps_per_iteration: train steps per outer iteration (the whole run for "symmetric").
      total_steps: train steps of the run.
      batch_size: global batch size.
    """

    objective: str
    num_train: int
    population: int
    epochs_per_iteration: int | None
    steps_per_iteration: int
    total_steps: int
    batch_size: int

    def iteration_of(self, step: int) -> int:
        return step // self.steps_per_iteration

    def ends_iteration(self, step_done: int) -> bool:
        """Whether the step that brings the count to `step_done` closes an outer iteration."""
        return step_done % self.steps_per_iteration == 0 or step_done == self.total_steps


def make_step_plan(config: Any, num_train: int) -> StepPlan:
    """Compute the step plan of a run; raises ValueError when a split is too small for a batch."""
    batch_size = int(config.train.batch_size)
    num_steps = int(config.train.num_steps)
    if config.loss.objective == "adsh":
        population = min(int(config.loss.adsh.num_samples), num_train)
        epochs = int(config.loss.adsh.epochs_per_iteration)
        steps_per_iteration = population * epochs // batch_size
        if steps_per_iteration == 0:
            raise ValueError(
                f"config.loss.adsh.num_samples={population} images x {epochs} epochs give no full "
                f"batch of config.train.batch_size={batch_size}; lower the batch size"
            )
        total = steps_per_iteration * int(config.loss.adsh.outer_iterations)
        if num_steps > 0:
            total = min(total, num_steps)
        return StepPlan("adsh", num_train, population, epochs, steps_per_iteration, total, batch_size)

    epochs = int(config.train.num_epochs) or None
    if epochs is not None:
        total = num_train * epochs // batch_size
        if total == 0:
            raise ValueError(
                f"the training split has {num_train} images, fewer than one batch of "
                f"config.train.batch_size={batch_size}; lower the batch size"
            )
        if num_steps > 0:
            total = min(total, num_steps)
    else:
        total = num_steps
    return StepPlan("symmetric", num_train, num_train, epochs, max(total, 1), total, batch_size)


def sampled_rows(plan: StepPlan, seed: int, iteration: int) -> np.ndarray:
    """Return the training rows (int64 [population], sorted) an outer iteration trains on."""
    if plan.objective != "adsh":
        return np.arange(plan.num_train, dtype=np.int64)
    rng = np.random.default_rng([seed, _SAMPLE_SALT, iteration])
    return np.sort(rng.choice(plan.num_train, size=plan.population, replace=False)).astype(np.int64)


def stream_positions(plan: StepPlan, seed: int, step: int) -> np.ndarray:
    """Return the positions in the iteration's population (int64 [batch]) of a global step's batch."""
    iteration = plan.iteration_of(step)
    within = step - iteration * plan.steps_per_iteration
    stream = np.arange(within * plan.batch_size, (within + 1) * plan.batch_size, dtype=np.int64)
    epochs = stream // plan.population
    offsets = stream % plan.population
    positions = np.empty_like(stream)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, _SHUFFLE_SALT, iteration, int(epoch)]).permutation(
            plan.population
        )
        selected = epochs == epoch
        positions[selected] = permutation[offsets[selected]]
    return positions


def feature_train_batch(
    plan: StepPlan,
    seed: int,
    step: int,
    cache: FeatureCache,
    train_cache_rows: np.ndarray,
    train_labels: np.ndarray,
    sample: np.ndarray,
) -> dict[str, Any]:
    """Return this process's rows of global step `step`'s batch, read from the feature cache.

    Each image shows view 0 (eval preprocessing) or view 1 (its horizontal flip), drawn from
    `seed` and the step. Keys: "inputs" (list of float16 [b, h, w, C]), "label", "index" (row in
    the training split) and "sample_position" (row in the iteration's sample).
    """
    positions = stream_positions(plan, seed, step)
    views = np.random.default_rng([seed, _VIEW_SALT, step]).integers(0, 2, size=positions.shape[0])
    rows = mesh_lib.process_rows(plan.batch_size)
    positions, views = positions[rows], views[rows]
    train_rows = sample[positions]
    return {
        "inputs": cache.gather_maps(train_cache_rows[train_rows], views),
        "label": train_labels[train_rows].astype(np.int32),
        "index": train_rows.astype(np.int32),
        "sample_position": positions.astype(np.int32),
    }


def feature_eval_batches(
    cache: FeatureCache, cache_rows: np.ndarray, global_batch_size: int
) -> Iterator[dict[str, Any]]:
    """Yield this process's rows of padded global batches over a split's cached features (view 0).

    Global batch g covers split rows [g * B, (g + 1) * B); padding rows have index -1.
    """
    num_rows = cache_rows.shape[0]
    local = mesh_lib.process_rows(global_batch_size)
    for start in range(0, num_rows, global_batch_size):
        split_rows = np.arange(start, start + global_batch_size, dtype=np.int64)[local]
        real = split_rows < num_rows
        safe_rows = np.where(real, split_rows, 0)
        maps = cache.gather_maps(cache_rows[safe_rows], np.zeros_like(safe_rows))
        yield {
            "inputs": maps,
            "index": np.where(real, split_rows, -1).astype(np.int32),
            "mask": real,
        }


def image_eval_batches(split: ImageSplit, config: Any, mean: np.ndarray, std: np.ndarray,
                       global_batch_size: int, flip: bool = False) -> Iterator[dict[str, Any]]:
    """Yield this process's rows of evaluation-preprocessed image batches of `split`.

    Keys: "inputs" float32 [b, H, W, 3], "index" (-1 for padding), "mask", and with `flip`,
    "inputs_flipped".
    """
    loader = pipeline.make_eval_loader(
        split,
        global_batch_size=global_batch_size,
        image_size=int(config.data.image_size),
        resize_size=int(config.data.resize_size),
        mean=mean,
        std=std,
        flip=flip,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **pipeline.loader_kwargs_from_config(config.data),
    )
    for batch in loader:
        out = {"inputs": batch["image"], "index": batch["index"], "mask": batch["mask"]}
        if flip:
            out["inputs_flipped"] = batch["image_flipped"]
        yield out


def make_image_train_loader(
    split: ImageSplit, config: Any, mean: np.ndarray, std: np.ndarray, plan: StepPlan, iteration: int
):
    """Build the grain train loader of one outer iteration over `split` (already subset for ADSH)."""
    seed = int(config.seed) * 100003 + iteration
    return pipeline.make_train_loader(
        split,
        global_batch_size=plan.batch_size,
        image_size=int(config.data.image_size),
        mean=mean,
        std=std,
        seed=seed,
        num_epochs=plan.epochs_per_iteration,
        resize_size=int(config.data.resize_size),
        crop_scale=tuple(config.data.crop_scale),
        crop_ratio=tuple(config.data.crop_ratio),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **pipeline.loader_kwargs_from_config(config.data),
    )
