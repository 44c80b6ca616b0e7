"""Metrics out of the training job: JSON lines, TensorBoard and atomic JSON files.

Only process 0 writes. Every other process gets a writer whose methods do nothing, so call sites
need no process checks.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


def to_jsonable(value: Any) -> Any:
    """Convert numpy and JAX scalars and arrays (recursively) to JSON types."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (jax.Array, np.ndarray)):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json_atomic(path: epath.PathLike, payload: Any) -> None:
    """Write `payload` as JSON to `path` through a temporary file in the same folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n"
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    temporary.write_text(text)
    temporary.replace(path)


class MetricWriter:
    """Append metrics to `workdir/metrics.jsonl` and TensorBoard summaries under `workdir/tensorboard`."""

    def __init__(self, workdir: epath.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = epath.Path(workdir)
        self._summary_writer = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        from tensorboardX import SummaryWriter

        self._summary_writer = SummaryWriter(os.fspath(self.workdir / "tensorboard"))

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        """Record the scalars in `values` at `step`; `kind` ("train", "validation", ...) prefixes them."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind}
        record.update(to_jsonable(dict(values)))
        with (self.workdir / "metrics.jsonl").open("a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float, np.generic)) or (
                isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
            ):
                self._summary_writer.add_scalar(f"{kind}/{name}", float(value), int(step))

    def flush(self) -> None:
        if self._summary_writer is not None:
            self._summary_writer.flush()

    def close(self) -> None:
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
