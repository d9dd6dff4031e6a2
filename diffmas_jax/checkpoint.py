"""Training checkpoints with orbax: adapters, optimizer state, step, data position, RNG.

Orbax writes each step into a temporary directory and renames it only once
complete, so a process killed at any moment (mid-save included) leaves the
previous checkpoints intact and no half-written one is ever restored. Restoring
rebuilds the exact TrainState (the data position is the micro-step count, see
`diffmas_jax.data`), so a resumed run ends bitwise equal to an uninterrupted one
on the same machine.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffmas_jax import paths

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A workdir's checkpoints belong to a different run configuration."""


class Checkpointer:
  """Saves every `every_steps` micro-steps (and on demand); keeps `max_to_keep`."""

  def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2,
               async_save: bool = True):
    # A local path becomes absolute; a URL (gs://...) stays a URL (orbax and
    # tensorstore read and write it through epath).
    self.directory = str(paths.as_path(directory))
    self.every_steps = max(1, int(every_steps))
    self._manager = ocp.CheckpointManager(
        paths.as_path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as `step`."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, fingerprint: dict | None = None
              ) -> tuple[Any, dict] | None:
    """(state, meta) of the latest finished checkpoint, or None when there is none.

    `abstract_state` gives structure, shapes, dtypes and shardings (e.g. from
    jax.eval_shape of the initial state with .sharding set). `fingerprint`, if
    given, must equal the one saved in meta, so a changed config cannot silently
    continue an old run.
    """
    step = self.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = dict(restored.meta)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
      saved = json.dumps(meta.get("fingerprint"), sort_keys=True)
      raise CheckpointMismatchError(
          f"{self.directory} holds checkpoints of a different run (saved config {saved}, now "
          f"{json.dumps(fingerprint, sort_keys=True)}). Use a new --workdir, or restore the "
          "old settings to resume.")
    log.info("restored checkpoint step %d from %s", step, self.directory)
    return restored.state, meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, as restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
