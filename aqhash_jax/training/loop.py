"""One training run at one code length: set-up, train loop, validation, final metrics, export."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from aqhash_jax.data.sources import RetrievalSplits, concatenate_splits
from aqhash_jax.models import chunking
from aqhash_jax.models.backbones import input_normalization
from aqhash_jax.training import evaluation, inputs
from aqhash_jax.training import mesh as mesh_lib
from aqhash_jax.training.checkpoint import (
    Checkpointer,
    abstract_like,
    decode_iterator_state,
    encode_iterator_state,
)
from aqhash_jax.training.export import export_run
from aqhash_jax.training.feature_cache import FeatureCache, build_cache
from aqhash_jax.training.metric_writer import MetricWriter, write_json_atomic
from aqhash_jax.training.model_init import (
    backbone_feature_shapes,
    backbone_variables,
    make_model,
    variables_fingerprint,
)
from aqhash_jax.training.optim import make_optimizer
from aqhash_jax.training.state import TrainState, dcc_update, jit_train_step, make_train_step


@dataclasses.dataclass
class RunResult:
    """Outcome of a run: its final metrics, or `stopped=True` when stop_after_steps cut it short."""

    workdir: str
    code_length: int
    metrics: dict | None
    stopped: bool


def _to_plain(tree: Any) -> Any:
    """Make every container a plain dict (flax may return FrozenDict)."""
    if hasattr(tree, "items"):
        return {key: _to_plain(value) for key, value in tree.items()}
    return tree


def prepare_feature_cache(
    config: Any,
    splits: RetrievalSplits,
    backbone_vars: dict,
    cache_root: str,
    mesh: jax.sharding.Mesh,
) -> FeatureCache:
    """Open or fill the feature cache of every split's images (eval view and its flip)."""
    from aqhash_jax.models.backbones import create_backbone

    parts = [splits.train, splits.query, splits.database]
    if splits.validation is not None:
        parts.append(splits.validation)
    seen: set[str] = set()
    unique = []
    for split in parts:
        keep = [row for row, path in enumerate(split.paths) if not (path in seen or seen.add(path))]
        if keep:
            unique.append(split.subset(keep))
    union = concatenate_splits(unique, "feature_cache") if len(unique) > 1 else unique[0]

    mean, std = input_normalization(config.model.backbone)
    key_fields = {
        "backbone": config.model.backbone,
        "weights": variables_fingerprint(backbone_vars),
        "image_size": int(config.data.image_size),
        "resize_size": int(config.data.resize_size),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "dtype": config.model.dtype,
        "conv_impl": config.model.conv_impl,
        "preprocessing": "resize shorter side, centre crop; views: as is, horizontal flip",
    }
    module = create_backbone(
        config.model.backbone,
        dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32,
        conv_impl=config.model.conv_impl,
        image_size=int(config.data.image_size),
    )
    replicated = mesh_lib.replicated(mesh)
    sharded = mesh_lib.batch_sharded(mesh)

    def extract(variables, images, flipped):
        outputs = [
            chunking.apply_in_chunks(
                lambda x: module.apply(variables, x, train=False),
                x,
                chunk_size=config.model.get("inference_chunk_size"),
                num_shards=mesh.devices.size,
            )
            for x in (images, flipped)
        ]
        return [
            {"feature_maps": [m.astype(jnp.float16) for m in out["feature_maps"]],
             "pooled": out["pooled"].astype(jnp.float16)}
            for out in outputs
        ]

    extract_fn = jax.jit(extract, in_shardings=(replicated, sharded, sharded), out_shardings=sharded)

    def extract_batches() -> Iterator:
        variables = mesh_lib.replicate(mesh, backbone_vars)
        batch_size = int(config.train.feature_batch_size)
        for batch in inputs.image_eval_batches(union, config, mean, std, batch_size, flip=True):
            global_batch = mesh_lib.shard_batch(
                mesh, {"inputs": batch["inputs"], "flipped": batch["inputs_flipped"], "index": batch["index"]}
            )
            views = extract_fn(variables, global_batch["inputs"], global_batch["flipped"])
            host = mesh_lib.to_host({"views": views, "index": global_batch["index"]})
            yield (host["index"], *host["views"])

    cache, extracted = build_cache(cache_root, key_fields, union.paths, extract_batches)
    logging.info("feature cache %s: %s", cache.folder, "extracted" if extracted else "reused")
    return cache


class Trainer:
    """State and helpers of one run; `run()` executes it."""

    def __init__(self, config: Any, workdir: str, splits: RetrievalSplits, *, code_length: int,
                 cache_root: str, mesh: jax.sharding.Mesh):
        self.config = config
        self.workdir = epath.Path(workdir)
        self.splits = splits
        self.code_length = code_length
        self.cache_root = cache_root
        self.mesh = mesh
        self.features_mode = config.train.mode == "features"
        self.seed = int(config.seed)
        self.num_classes = (
            splits.train.num_classes if int(config.model.num_classes) == -1 else int(config.model.num_classes)
        )
        self.model, self.model_dict = make_model(config, code_length, self.num_classes)
        self.loss_config = {
            "objective": config.loss.objective,
            "gamma": float(config.loss.gamma),
            "similarity_weight": float(config.loss.similarity_weight),
            "quantization_weight": float(config.loss.quantization_weight),
            "symmetric_form": config.loss.symmetric_form,
            "classification_weight": float(config.loss.classification_weight),
            "num_classes": int(splits.train.num_classes),
            "seed": self.seed,
        }
        self.plan = inputs.make_step_plan(config, len(splits.train))
        self.mean, self.std = input_normalization(config.model.backbone)
        self.writer = MetricWriter(self.workdir)

    # ----------------------------------------------------------------------------------------
    # Set-up

    def _init_state(self) -> TrainState:
        config = self.config
        rng = jax.random.PRNGKey(self.seed)
        backbone_rng, head_rng, code_rng, state_rng = jax.random.split(rng, 4)
        self.backbone_vars = backbone_variables(config, backbone_rng)

        if self.features_mode:
            self.cache = prepare_feature_cache(config, self.splits, self.backbone_vars, self.cache_root, self.mesh)
            self.train_cache_rows = self.cache.rows_of(self.splits.train.paths)
            map_shapes = self.cache.map_shapes
        else:
            map_shapes = backbone_feature_shapes(config)

        # The head is initialised alone on dummy feature maps, so the backbone's initialiser is
        # never compiled a second time.
        dummy = [jnp.zeros((1,) + tuple(shape), jnp.float32) for shape in map_shapes]
        head_vars = jax.jit(
            lambda key: self.model.init(key, dummy, train=False, method=type(self.model).from_features)
        )(head_rng)
        head_vars = _to_plain(jax.device_get(head_vars))
        params = dict(head_vars["params"])
        batch_stats = dict(head_vars.get("batch_stats", {}))
        if not self.features_mode:
            params["backbone"] = self.backbone_vars["params"]
            if "batch_stats" in self.backbone_vars:
                batch_stats["backbone"] = self.backbone_vars["batch_stats"]

        self.optimizer, self.schedule = make_optimizer(
            config.optim, params, total_steps=self.plan.total_steps,
            steps_per_outer_iteration=self.plan.steps_per_iteration,
            backbone_name=config.model.backbone,
        )
        num_loss_bits = self.model.num_loss_bits
        if config.loss.objective == "adsh":
            code_matrix = np.where(
                jax.random.normal(code_rng, (self.plan.num_train, num_loss_bits)) >= 0, 1, -1
            ).astype(np.int8)
            sample_codes = np.zeros((self.plan.population, num_loss_bits), np.float32)
        else:
            # The symmetric objective uses neither array. One unused row keeps them savable,
            # because orbax rejects zero-size arrays.
            code_matrix = np.zeros((1, num_loss_bits), np.int8)
            sample_codes = np.zeros((1, num_loss_bits), np.float32)

        state = TrainState(
            step=np.zeros((), np.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=self.optimizer.init(params),
            rng=np.asarray(state_rng),
            code_matrix=code_matrix,
            sample_codes=sample_codes,
        )
        return mesh_lib.replicate(self.mesh, jax.device_get(state))

    def _compile(self, state: TrainState) -> None:
        replicated = mesh_lib.replicated(self.mesh)
        state_sharding = jax.tree_util.tree_map(lambda _: replicated, state)
        train_step = make_train_step(
            self.model, self.optimizer, self.loss_config,
            from_features=self.features_mode, num_samples=self.plan.population,
        )
        self.train_step = jit_train_step(train_step, state_sharding, mesh_lib.batch_sharded(self.mesh), replicated)
        self.encode_fn = evaluation.make_encode_fn(
            self.model,
            self.mesh,
            from_features=self.features_mode,
            chunk_size=self.config.model.get("inference_chunk_size"),
        )
        self.train_labels_device = mesh_lib.replicate(self.mesh, self.splits.train.labels)

    # ----------------------------------------------------------------------------------------
    # Batches

    def _iteration_inputs(self, iteration: int, iterator_state: Any = None) -> dict:
        """Per-iteration data: sampled rows (and, end to end, a grain iterator over them)."""
        sample = inputs.sampled_rows(self.plan, self.seed, iteration)
        data = {"iteration": iteration, "sample": sample}
        if self.features_mode:
            return data
        split = self.splits.train.subset(sample, name=f"{self.splits.train.name}[iteration {iteration}]")
        loader = inputs.make_image_train_loader(split, self.config, self.mean, self.std, self.plan, iteration)
        iterator = iter(loader)
        if iterator_state is not None:
            iterator.set_state(decode_iterator_state(iterator_state))
        data["iterator"] = iterator
        return data

    def _train_batch(self, data: dict, step: int) -> dict:
        if self.features_mode:
            return inputs.feature_train_batch(
                self.plan, self.seed, step, self.cache, self.train_cache_rows,
                self.splits.train.labels, data["sample"],
            )
        batch = next(data["iterator"])
        # Subset rows are positions in the sample; B is addressed by training-split rows.
        # NOTE: rows whose image failed to decode (mask False) still enter the loss as zeros.
        position = np.asarray(batch["index"], dtype=np.int64)
        return {
            "inputs": batch["image"],
            "label": np.asarray(batch["label"], dtype=np.int32),
            "index": data["sample"][position].astype(np.int32),
            "sample_position": position.astype(np.int32),
        }

    def _encode_split(self, state: TrainState, split, batch_size: int) -> np.ndarray:
        if self.features_mode:
            rows = self.cache.rows_of(split.paths)
            batches = inputs.feature_eval_batches(self.cache, rows, batch_size)
        else:
            batches = inputs.image_eval_batches(split, self.config, self.mean, self.std, batch_size)
        return evaluation.encode_batches(
            self.encode_fn, state.params, state.batch_stats, batches, len(split), self.mesh
        )

    # ----------------------------------------------------------------------------------------
    # Validation and checkpoints

    def _validate(self, state: TrainState) -> float | None:
        if self.splits.validation is None:
            return None
        batch_size = int(self.config.eval.batch_size)
        query = self._encode_split(state, self.splits.validation, batch_size)
        database = self._encode_split(state, self.splits.train, batch_size)
        results = evaluation.compute_metrics(
            query, database, self.splits.validation.labels, self.splits.train.labels,
            self.config.eval, rankings=(self.config.eval.ranking,),
        )[self.config.eval.ranking]
        return float(results["map"])

    def _checkpoint_metadata(self, step: int, data: dict, best: dict) -> dict:
        metadata = {"step": step, "code_length": self.code_length, "best": best}
        if not self.features_mode and "iterator" in data:
            metadata["iteration"] = data["iteration"]
            metadata["iterator_state"] = encode_iterator_state(data["iterator"].get_state())
        return metadata

    # ----------------------------------------------------------------------------------------
    # The run

    def run(self) -> RunResult:
        config = self.config
        start_time = time.perf_counter()
        state = self._init_state()
        self._compile(state)

        checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=int(config.train.keep_checkpoints))
        best_checkpointer = None
        if config.train.select == "validation":
            best_checkpointer = Checkpointer(self.workdir / "checkpoints_best", max_to_keep=1)

        best = {"step": -1, "map": -1.0}
        iterator_state = None
        latest = checkpointer.latest_step()
        if latest is not None:
            state, metadata = checkpointer.restore(latest, abstract_like(state))
            best = metadata.get("best", best)
            iterator_state = metadata.get("iterator_state")
            logging.info("resuming from step %d", latest)

        step = int(jax.device_get(state.step))
        plan = self.plan
        logging.info(
            "training %d steps (%d per outer iteration), global batch %d, %d devices, %d processes",
            plan.total_steps, plan.steps_per_iteration, plan.batch_size, jax.device_count(), jax.process_count(),
        )
        data = self._iteration_inputs(plan.iteration_of(step), iterator_state) if step < plan.total_steps else {}
        stop_after = int(config.train.stop_after_steps)
        interval_start, interval_steps = time.perf_counter(), 0
        run_start_step = step
        pending = []
        stopped = False

        while step < plan.total_steps:
            iteration = plan.iteration_of(step)
            if data.get("iteration") != iteration:
                data = self._iteration_inputs(iteration)
            local_batch = self._train_batch(data, step)
            batch = mesh_lib.shard_batch(self.mesh, local_batch)
            state, metrics = self.train_step(state, batch, self.train_labels_device)
            pending.append(metrics)
            step += 1
            interval_steps += 1

            if plan.objective == "adsh" and plan.ends_iteration(step):
                sample = jnp.asarray(data["sample"], jnp.int32)
                state = dcc_update(
                    state, sample, jnp.asarray(self.splits.train.labels[data["sample"]]),
                    self.train_labels_device, self.loss_config["gamma"],
                )
                state = state.replace(sample_codes=jnp.zeros_like(state.sample_codes))
                logging.info("outer iteration %d done: code matrix updated", iteration + 1)

            if step % int(config.train.log_every) == 0 or step == plan.total_steps:
                values = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[-1]}
                pending = []
                elapsed = time.perf_counter() - interval_start
                rate = interval_steps * plan.batch_size / max(elapsed, 1e-9)
                seconds_per_step = elapsed / max(interval_steps, 1)
                values["learning_rate"] = float(self.schedule(step))
                values["images_per_second"] = rate
                self.writer.write(step, "train", values)
                terms = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k.startswith("loss_"))
                logging.info(
                    "step %d/%d iteration %d epoch %.2f loss %.5g (%s) %.1f images/s, %.0f s left",
                    step, plan.total_steps, iteration + 1,
                    step * plan.batch_size / plan.population, values["loss"], terms, rate,
                    seconds_per_step * (plan.total_steps - step),
                )
                interval_start, interval_steps = time.perf_counter(), 0

            eval_every = int(config.train.eval_every)
            if eval_every and step % eval_every == 0 and self.splits.validation is not None:
                best = self._after_validation(state, step, best, best_checkpointer)

            if step % int(config.train.checkpoint_every) == 0 or step == plan.total_steps:
                checkpointer.save(step, state, self._checkpoint_metadata(step, data, best))

            if stop_after and step >= stop_after and step < plan.total_steps:
                logging.info("stopping after step %d (config.train.stop_after_steps)", step)
                stopped = True
                break

        train_seconds = time.perf_counter() - start_time
        if stopped:
            checkpointer.close()
            self.writer.close()
            return RunResult(os.fspath(self.workdir), self.code_length, None, True)

        if self.splits.validation is not None and best["step"] != step:
            best = self._after_validation(state, step, best, best_checkpointer)
        final_state, selected_step = state, step
        if best_checkpointer is not None and best["step"] >= 0 and best["step"] != step:
            final_state, _ = best_checkpointer.restore(best["step"], abstract_like(state))
            selected_step = best["step"]
        checkpointer.close()

        metrics = self._final_metrics(final_state)
        metrics.update({
            "code_length": self.code_length,
            "selected_step": selected_step,
            "selection": config.train.select,
            "final_step": step,
            "validation_map": best["map"] if best["step"] >= 0 else None,
            "steps_this_session": step - run_start_step,
            "seconds": time.perf_counter() - start_time,
            "train_seconds": train_seconds,
        })
        if jax.process_index() == 0:
            write_json_atomic(self.workdir / "metrics.json", metrics)
        table = evaluation.format_table({k: metrics[k] for k in ("symmetric", "asymmetric") if k in metrics})
        logging.info("final retrieval metrics (code length %d, step %d):\n%s", self.code_length, selected_step, table)
        print(f"code length {self.code_length}, selected step {selected_step}\n{table}", flush=True)

        if config.export.enabled:
            self._export(final_state)
        self.writer.close()
        return RunResult(os.fspath(self.workdir), self.code_length, metrics, False)

    def _after_validation(self, state, step, best, best_checkpointer) -> dict:
        value = self._validate(state)
        if value is None:
            return best
        self.writer.write(step, "validation", {"map": value})
        logging.info("step %d validation mAP %.4f (best %.4f at step %d)", step, value, best["map"], best["step"])
        if value > best["map"]:
            best = {"step": step, "map": value}
            if best_checkpointer is not None:
                best_checkpointer.save(step, state, {"step": step, "map": value})
        return best

    def _final_metrics(self, state: TrainState) -> dict:
        batch_size = int(self.config.eval.batch_size)
        query_codes = self._encode_split(state, self.splits.query, batch_size)
        database_codes = self._encode_split(state, self.splits.database, batch_size)
        self.final_codes = {"query": query_codes, "database": database_codes}
        metrics = {
            "symmetric": evaluation.compute_metrics(
                query_codes, database_codes, self.splits.query.labels, self.splits.database.labels, self.config.eval
            )
        }
        if self.config.loss.objective == "adsh":
            code_matrix = np.asarray(mesh_lib.to_host(state.code_matrix))
            asymmetric_codes, replaced = evaluation.asymmetric_database_codes(
                database_codes, self.splits.database.paths, self.splits.train.paths, code_matrix, self.code_length
            )
            metrics["asymmetric"] = evaluation.compute_metrics(
                query_codes, asymmetric_codes, self.splits.query.labels, self.splits.database.labels, self.config.eval
            )
            metrics["asymmetric_rows_from_code_matrix"] = replaced
        return metrics

    def _export(self, state: TrainState) -> None:
        params = mesh_lib.to_host(state.params)
        batch_stats = mesh_lib.to_host(state.batch_stats)
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if self.features_mode:
            # The head was trained on features of the frozen backbone; join its weights.
            variables = {key: dict(value) for key, value in variables.items()}
            for collection, tree in self.backbone_vars.items():
                variables.setdefault(collection, {})["backbone"] = tree
        if jax.process_index() == 0:
            export_run(
                self.workdir, variables, self.model_dict, self.config,
                splits=self.splits, codes=self.final_codes,
            )
        mesh_lib.barrier("export")
