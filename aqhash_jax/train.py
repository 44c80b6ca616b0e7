r"""Train attribute-query hash codes: the main job of aqhash_jax.

    python -m aqhash_jax.train --config=configs/cub100.py --workdir=/tmp/cub100_run \
        [--config.model.code_length=32] [--config.train.code_lengths=12,24,32,48]

The same command runs on one CPU, on several local devices and across processes. For several
processes, start one per host with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID), or pass `--distributed=auto` where JAX detects the cluster (Cloud TPU, SLURM).
Without these the job is a single process.

A killed job resumes from its latest checkpoint when started again with the same workdir.
Outputs in the workdir: config.json (resolved config), checkpoints/, metrics.jsonl,
tensorboard/, metrics.json (final retrieval metrics) and export/ (codes and model). A sweep over
code lengths writes one such folder per length under bits_<K>/ and a summary.json.
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from aqhash_jax import host_memory
from aqhash_jax.training import mesh as mesh_lib
from aqhash_jax.training.config_checks import ConfigError, check_config, is_local_path, parse_code_lengths
from aqhash_jax.training.export import write_resolved_config
from aqhash_jax.training.metric_writer import write_json_atomic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder, local path or gs:// URL.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "'auto' calls jax.distributed.initialize() with cluster auto-detection (Cloud TPU, SLURM).",
)


def check_data_root(config) -> None:
    """Raise ConfigError when a local data source has no root folder."""
    data = config.data
    if data.source == "tfds":
        return
    root = str(data.root)
    if not root or (is_local_path(root) and not os.path.isdir(root)):
        raise ConfigError(
            f"config.data.root={root!r} is not an existing folder for data source {data.source!r}; "
            "point the config at a local copy with --config.data.root=/path/to/data"
        )


def load_splits(config):
    """Load the retrieval splits; data layout problems surface as ConfigError."""
    from aqhash_jax.data.sources import load_retrieval_splits

    check_data_root(config)
    return load_retrieval_splits(config.data)


def run_job(config, workdir: str) -> dict:
    """Validate, then train one run or a sweep of code lengths; return {code_length: metrics}."""
    from aqhash_jax.training.loop import Trainer

    check_config(config)
    splits = load_splits(config)
    code_lengths = parse_code_lengths(config.train.code_lengths)

    # Local workdirs are made absolute, so the paths in summary.json and the logs do not depend on
    # the directory the job was started from.
    if is_local_path(workdir):
        workdir = os.path.abspath(workdir)
    workdir_path = epath.Path(workdir)
    cache_root = config.train.feature_cache_dir or os.fspath(workdir_path / "feature_cache")
    if config.train.mode == "features" and not is_local_path(cache_root):
        raise ConfigError(
            f"the feature cache would go to {cache_root}, which is not local disk; set "
            "--config.train.feature_cache_dir=/local/path"
        )

    if jax.process_index() == 0:
        workdir_path.mkdir(parents=True, exist_ok=True)
        write_resolved_config(workdir_path, config)
    mesh_lib.barrier("workdir")
    mesh = mesh_lib.make_mesh()

    runs = []
    for code_length in code_lengths or (int(config.model.code_length),):
        run_dir = workdir_path / f"bits_{code_length}" if code_lengths else workdir_path
        run_config = config.copy_and_resolve_references()
        run_config.model.code_length = code_length
        if code_lengths:
            run_config.train.code_lengths = ""
            if jax.process_index() == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_resolved_config(run_dir, run_config)
        started = time.perf_counter()
        trainer = Trainer(run_config, os.fspath(run_dir), splits, code_length=code_length,
                          cache_root=cache_root, mesh=mesh)
        result = trainer.run()
        if result.stopped:
            logging.info("run at code length %d stopped early; start it again to resume", code_length)
            return {}
        runs.append((code_length, result.metrics, time.perf_counter() - started))

    results = {code_length: metrics for code_length, metrics, _ in runs}
    if code_lengths and jax.process_index() == 0:
        summary = {
            "code_lengths": list(code_lengths),
            "runs": {
                str(code_length): {
                    "workdir": os.fspath(workdir_path / f"bits_{code_length}"),
                    "symmetric_map": metrics["symmetric"]["tie-aware"]["map"],
                    "symmetric_map_ranked": metrics["symmetric"]["ranked"]["map"],
                    "asymmetric_map": metrics.get("asymmetric", {}).get("tie-aware", {}).get("map"),
                    "asymmetric_map_ranked": metrics.get("asymmetric", {}).get("ranked", {}).get("map"),
                    "seconds": seconds,
                }
                for code_length, metrics, seconds in runs
            },
        }
        write_json_atomic(workdir_path / "summary.json", summary)
        lines = [f"{'bits':>5} {'sym mAP':>9} {'sym ranked':>11} {'asym mAP':>9} {'seconds':>8}"]
        for code_length, row in summary["runs"].items():
            asymmetric = row["asymmetric_map"]
            lines.append(
                f"{code_length:>5} {row['symmetric_map']:9.4f} {row['symmetric_map_ranked']:11.4f} "
                f"{'-' if asymmetric is None else format(asymmetric, '9.4f'):>9} {row['seconds']:8.0f}"
            )
        print("\n".join(lines), flush=True)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("pass --config=configs/<name>.py and --workdir=DIR")
    try:
        host_memory.configure_host_allocator()
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    mesh_lib.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        auto_detect=_DISTRIBUTED.value == "auto",
    )
    logging.info(
        "process %d of %d, %d local devices, %d devices in all (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        run_job(_CONFIG.value, _WORKDIR.value)
    except ConfigError as error:
        # A config problem is the user's to fix: print the message without a traceback.
        raise app.UsageError(str(error)) from error


if __name__ == "__main__":
    app.run(main)
