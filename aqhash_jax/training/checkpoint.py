"""Checkpoints of the training job through orbax.

One checkpoint per saved step holds two items: "state", the `TrainState` pytree (StandardSave),
and "metadata", a JSON dict with the step, the data iterator state and the job's bookkeeping
(JsonSave). Orbax writes each checkpoint into a temporary folder and renames it when complete, so
a killed job leaves either a whole checkpoint or none; `max_to_keep` bounds how many are kept.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from aqhash_jax.training.config_checks import is_local_path

STATE_ITEM = "state"
METADATA_ITEM = "metadata"


def encode_iterator_state(state: Any) -> Any:
    """Make a data iterator state JSON-safe: bytes become {"base64": ...}, dicts pass through."""
    if isinstance(state, (bytes, bytearray)):
        return {"base64": base64.b64encode(bytes(state)).decode("ascii")}
    return state


def decode_iterator_state(state: Any) -> Any:
    """Invert `encode_iterator_state`."""
    if isinstance(state, dict) and set(state) == {"base64"}:
        return base64.b64decode(state["base64"])
    return state


class Checkpointer:
    """Save and restore `TrainState` plus JSON metadata under `directory`.

    Args:
      directory: local path or gs:// URL.
      max_to_keep: number of most recent checkpoints kept; None keeps all.
    """

    def __init__(self, directory: epath.PathLike, *, max_to_keep: int | None):
        # Orbax rejects relative checkpoint paths when it saves, so a local path is made absolute here.
        if is_local_path(directory):
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Saves block until written. The state is small next to a train epoch, and a
            # synchronous save cannot race with the donated state buffers of the next step.
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, METADATA_ITEM)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict) -> bool:
        """Save `state` and `metadata` as checkpoint `step`; a step that exists is left as it is."""
        if step in self._manager.all_steps():
            logging.info("checkpoint %d already exists in %s; not overwriting it", step, self.directory)
            return False
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    METADATA_ITEM: ocp.args.JsonSave(metadata),
                }
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        if saved:
            logging.info("saved checkpoint %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore checkpoint `step` into the shapes, dtypes and shardings of `abstract_state`."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    METADATA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        logging.info("restored checkpoint %d from %s", step, self.directory)
        return restored[STATE_ITEM], dict(restored[METADATA_ITEM])

    def restore_metadata(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA_ITEM])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """Return ShapeDtypeStructs with the shardings of `tree` (restore target)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
