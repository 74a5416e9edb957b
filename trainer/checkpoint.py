"""Checkpoints with orbax: train state (params, optimizer, step, rng), the grain iterator's state
and the config, saved asynchronously every `checkpoint_every` steps under WORKDIR/checkpoints/STEP.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
leaves no step that looks finished. Restoring walks the finished steps newest first and falls back
to an older one (with a warning) when a step cannot be read. A state with a non-finite parameter is
never saved (trainer/divergence.py): the last good checkpoint stays the newest.
"""
import dataclasses
import json
import logging
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from configs import ConfigError, base
from trainer import divergence

# Fields that change the parameters' shapes, structure or meaning: a checkpoint made with other
# values cannot be resumed. (Compute dtype and remat may change between runs, and the NSA gates'
# starting values only shape a new model: a checkpoint that lacks them, made before they existed,
# resumes.)
ARCHITECTURE_FIELDS = ("model", "attention.kind", "nsa", "mla", "dsa")
RESUMABLE_CHANGES = ("model.dtype", "model.remat", "dsa.indexer_loss_coef", "nsa.initial_gates",
                     "nsa.converted_gates")
# TrainState fields added after checkpoints were being written, with the value a checkpoint made
# before them restores with.
ADDED_STATE_FIELDS = {"skips": 0}


def workdir_path(path: str) -> epath.Path:
  """A workdir as an epath: local (made absolute) or remote (gs://...); every file access of a run
  goes through orbax or epath, so checkpoints and metrics can live on shared storage."""
  return epath.Path(path) if "://" in str(path) else epath.Path(path).resolve()


def checkpoint_dir(path: str) -> epath.Path:
  """A run's workdir or its checkpoints/ directory -> the checkpoints/ directory."""
  nested = workdir_path(path) / "checkpoints"
  return nested if nested.is_dir() else workdir_path(path)


def _architecture(config_dict: dict) -> dict:
  flat = {}
  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else k, v)
    else:
      flat[prefix] = node
  walk("", config_dict)
  keep = lambda k: any(k == f or k.startswith(f + ".") for f in ARCHITECTURE_FIELDS)
  return {k: v for k, v in flat.items() if keep(k) and k not in RESUMABLE_CHANGES}


def check_compatible(saved: dict, config_dict: dict, where: str) -> None:
  """Raise ConfigError naming the first architecture field that differs from the checkpoint's."""
  old, new = _architecture(saved), _architecture(config_dict)
  for field in sorted(set(old) | set(new)):
    if old.get(field) != new.get(field):
      raise ConfigError(field, new.get(field),
                        f"the checkpoint in {where} was made with {field}={old.get(field)!r}; "
                        "resume with the same value, or start a new --workdir (--config.init_from "
                        "takes parameters only when shapes match)")


class Checkpointer:
  def __init__(self, workdir: str, config):
    self.directory = workdir_path(workdir) / "checkpoints"
    self.config_dict = json.loads(config.to_json())
    self.every = config.checkpoint_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def due(self, step: int, force: bool = False) -> bool:
    """Whether save(step, ..., force) saves (unless the parameters are not finite)."""
    return force or step % self.every == 0

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    """Starts an async save if `step` is a multiple of checkpoint_every (or `force`), unless a
    parameter is not finite: then it warns and saves nothing (the last good checkpoint stays)."""
    if not self.due(step, force):
      return False
    if not divergence.params_finite(state.params):
      latest = self.latest_step()
      logging.warning("not saving step %d: a parameter is not finite; %s", step,
                      f"the newest checkpoint stays step {latest}" if latest else "no checkpoint yet")
      return False
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config_dict),
        data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore_latest(self, abstract_state, data_iter):
    """(state, step) from the newest readable checkpoint, or (None, 0) when there is none.
    `data_iter` is restored in place. A checkpoint of another architecture raises ConfigError."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      where = self.directory / str(step)
      try:
        saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back to an older one
        logging.warning("checkpoint %s is unreadable (%s: %s); trying an older one", where, type(e).__name__, e)
        continue
      check_compatible(saved_config, self.config_dict, where)
      try:
        target, added = self._state_target(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # noqa: BLE001
        logging.warning("checkpoint %s is incomplete or corrupt (%s: %s); moved to %s, trying an older one",
                        where, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                        self._quarantine(step))
        continue
      state = restored["state"]
      if added:
        state = abstract_state.replace(**state, **added)
      return state, step
    return None, 0

  def _state_target(self, step: int, abstract_state):
    """(restore target, {field: value}): abstract_state itself, or for a checkpoint made before
    some ADDED_STATE_FIELDS, a dict of the fields it holds and the added fields' initial values."""
    saved = set(self.manager.item_metadata(step)["state"].keys())
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    missing = set(fields) - saved
    if not missing or not missing <= set(ADDED_STATE_FIELDS):
      return abstract_state, {}
    added = {name: jax.jit(lambda v=ADDED_STATE_FIELDS[name], a=fields[name]: jnp.full(a.shape, v, a.dtype),
                           out_shardings=fields[name].sharding)() for name in missing}
    return {k: v for k, v in fields.items() if k not in missing}, added

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step (saves in flight finish first), or None."""
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def set_aside(self, first_step: int) -> list[int]:
    """Moves the finished checkpoints of steps >= first_step to WORKDIR/checkpoints_diverged/
    (kept, never deleted), so that a re-run resumes from the one before them; their steps."""
    self.manager.wait_until_finished()
    moved = sorted(s for s in self.manager.all_steps() if s >= first_step)
    for step in moved:
      self._quarantine(step, "checkpoints_diverged")
    return moved

  def _quarantine(self, step: int, folder: str = "checkpoints_corrupt") -> str:
    """Moves a step out of the way (kept for inspection, never deleted): later saves of the same
    step number would otherwise collide with it."""
    target = self.directory.parent / folder / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(path: str, abstract_params, alias=lambda names: names):
  """(params, step, fresh) from the newest checkpoint under `path` (a workdir or checkpoints/
  dir), for init_from. Parameters the checkpoint lacks (e.g. DSA's indexer when the checkpoint
  is a dense MLA run) are None in `params` and named in `fresh`: the caller keeps their fresh
  initialisation. A parameter the checkpoint lacks under its own name is read under alias(names)
  when it has that (NSA's separate K/V from a dense run's k/v: model/convert.py). A parameter
  present with another shape raises ConfigError."""
  directory = checkpoint_dir(path)
  with ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                        "config": ocp.JsonCheckpointHandler()}) as manager:
    step = manager.latest_step()
    if step is None:
      raise ConfigError("init_from", path, "holds no finished checkpoint")
    saved = manager.item_metadata(step)["state"]["params"]

    def lookup(names):
      node = saved
      for k in names:
        node = node.get(k) if hasattr(node, "get") else None
      return node

    sources, fresh, target = {}, [], {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
      names = tuple(str(k.key) for k in key_path)
      source = next((n for n in (names, alias(names)) if lookup(n) is not None), None)
      if source is None:
        fresh.append("/".join(names))
        continue
      node = lookup(source)
      if tuple(node.shape) != tuple(leaf.shape):
        raise ConfigError("init_from", path, f"parameter {'/'.join(names)} has shape {tuple(node.shape)} there, "
                          f"{tuple(leaf.shape)} here")
      sources[names] = source
      branch = target
      for k in source[:-1]:
        branch = branch.setdefault(k, {})
      branch[source[-1]] = leaf
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": target}, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), {"params": target}),
            partial_restore=True)))["state"]["params"]

  def take(key_path, _):
    names = tuple(str(k.key) for k in key_path)
    if names not in sources:
      return None
    node = restored
    for k in sources[names]:
      node = node[k]
    return node
  return jax.tree_util.tree_map_with_path(take, abstract_params), step, fresh


def saved_config(directory, step: int | None = None):
  """(config, step) saved with checkpoint `step` (default the newest) under `directory`."""
  if not directory.is_dir():
    raise ConfigError("workdir", str(directory.parent if directory.name == "checkpoints" else directory),
                      "is not a run's directory (no checkpoints/ in it)")
  with ocp.CheckpointManager(directory, item_handlers={"config": ocp.JsonCheckpointHandler()}) as manager:
    available = sorted(manager.all_steps())
    if not available:
      raise ConfigError("workdir", str(directory), "holds no finished checkpoint")
    step = available[-1] if step is None else step
    if step not in available:
      raise ConfigError("step", step, f"no finished checkpoint at this step; available: "
                        f"{', '.join(map(str, available))}")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = base.get_config()             # fields added since the run keep their defaults
  config.update(ml_collections.ConfigDict(saved))
  return config, step


def saved_params(directory, step: int, abstract_params):
  """The parameters of checkpoint `step`, placed as `abstract_params` say (optimizer state unread)."""
  target = {"params": abstract_params}
  with ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
        partial_restore=True)))
  return restored["state"]["params"]
