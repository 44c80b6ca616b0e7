"""Export of a finished run and loading it back for the encode, search and explain tools.

`workdir/export/` holds:
- `query_codes.npy`, `database_codes.npy` with their JSON sidecars (`save_codes`), carrying ids,
  paths, labels, the split and a fingerprint of the model parameters and config;
- `model.msgpack`: the inference variables {"params", "batch_stats"} of `HashModel` (backbone and
  head; the head has no auxiliary-branch parameters) serialised with `flax.serialization`;
- `model_config.json`: the `build_model` config of those variables;
- `config.json`: the run's full training config.

The folder is assembled under a temporary name and swapped in by renames, so a failed export
leaves a previous complete export in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from flax import serialization

from aqhash_jax.models.hashing import HashModel, build_model
from aqhash_jax.retrieval.codes import sign_codes
from aqhash_jax.retrieval.export import compute_fingerprint, save_codes
from aqhash_jax.training.metric_writer import to_jsonable, write_json_atomic

EXPORT_DIR = "export"
MODEL_FILE = "model.msgpack"
MODEL_CONFIG_FILE = "model_config.json"
CONFIG_FILE = "config.json"


def _write_export(folder: str, variables: dict, model_dict: dict, config_json: dict, splits: Any, codes: dict) -> None:
    payload = serialization.msgpack_serialize(serialization.to_state_dict(variables))
    with open(os.path.join(folder, MODEL_FILE), "wb") as handle:
        handle.write(payload)
    fingerprint = compute_fingerprint(
        {"params_sha256": compute_fingerprint(payload), "model": model_dict, "config": config_json}
    )
    with open(os.path.join(folder, MODEL_CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(model_dict, handle, indent=2, sort_keys=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(config_json, handle, indent=2, sort_keys=True)

    for name, split in (("query", splits.query), ("database", splits.database)):
        save_codes(
            os.path.join(folder, f"{name}_codes.npy"),
            sign_codes(codes[name]),
            ids=[int(i) for i in split.ids],
            paths=list(split.paths),
            labels=np.asarray(split.labels),
            split=name,
            fingerprint=fingerprint,
            extra={"split_name": split.name},
        )


def export_run(workdir: epath.PathLike, variables: dict, model_dict: dict, config: Any, *,
               splits: Any, codes: dict) -> epath.Path:
    """Write `workdir/export` (see the module docstring) and return its path."""
    workdir = epath.Path(workdir)
    target = workdir / EXPORT_DIR
    config_json = to_jsonable(config.to_dict())
    local_workdir = "://" not in os.fspath(workdir)

    if local_workdir:
        staging = os.path.join(os.fspath(workdir), f".{EXPORT_DIR}.tmp-{uuid.uuid4().hex}")
        os.makedirs(staging)
    else:
        staging = tempfile.mkdtemp(prefix="aqhash_export_")
    try:
        _write_export(staging, to_jsonable_tree(variables), model_dict, config_json, splits, codes)
        if local_workdir:
            _swap_in(staging, os.fspath(target))
        else:
            remote_staging = workdir / f".{EXPORT_DIR}.tmp-{uuid.uuid4().hex}"
            remote_staging.mkdir(parents=True)
            for name in os.listdir(staging):
                epath.Path(os.path.join(staging, name)).copy(remote_staging / name)
            if target.exists():
                target.rmtree()
            remote_staging.rename(target)
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logging.info("exported codes and model to %s", target)
    return target


def to_jsonable_tree(variables: dict) -> dict:
    """Return the variables as nested dicts of numpy arrays (no FrozenDicts, no jax.Arrays)."""
    if hasattr(variables, "items"):
        return {key: to_jsonable_tree(value) for key, value in variables.items()}
    return np.asarray(variables)


def _swap_in(staging: str, target: str) -> None:
    """Replace `target` by `staging` with renames; the old folder is removed only afterwards."""
    previous = None
    if os.path.exists(target):
        previous = f"{target}.old-{uuid.uuid4().hex}"
        os.rename(target, previous)
    try:
        os.rename(staging, target)
    except OSError:
        if previous is not None:
            os.rename(previous, target)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def load_trained_model(workdir: epath.PathLike) -> tuple[HashModel, dict, dict]:
    """Load the exported model of a finished run.

    Args:
      workdir: the run's workdir (holding `export/`) or the export folder itself.

    Returns:
      (model, variables, config): the `HashModel`, its inference variables {"params",
      "batch_stats"} as numpy trees, and the run's training config as a dict. Apply the model
      with `model.apply(variables, images, train=False)` on images normalised with
      `input_normalization(config["model"]["backbone"])`.
    Raises:
      FileNotFoundError when the export is missing (the run did not finish or had
      config.export.enabled=False).
    """
    folder = epath.Path(workdir)
    if not (folder / MODEL_FILE).exists():
        folder = folder / EXPORT_DIR
    model_path = folder / MODEL_FILE
    if not model_path.exists():
        raise FileNotFoundError(
            f"{model_path} not found; train with config.export.enabled=True until the run finishes, "
            "or pass the workdir of a finished run"
        )
    model_dict = json.loads((folder / MODEL_CONFIG_FILE).read_text())
    config = json.loads((folder / CONFIG_FILE).read_text())
    variables = serialization.msgpack_restore(model_path.read_bytes())
    model = build_model(model_dict)
    return model, variables, config


def write_resolved_config(workdir: epath.PathLike, config: Any) -> None:
    """Write the resolved config to `workdir/config.json` atomically."""
    write_json_atomic(epath.Path(workdir) / CONFIG_FILE, config.to_dict())
