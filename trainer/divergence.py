"""Divergence guard (issue 16): a train step whose loss or gradient norm is not finite, or whose
update would make a parameter non-finite, changes nothing but the step counter (parameters and
optimizer state stay bitwise as they were) and is counted; after `optimizer.max_skipped_steps`
such steps in a row the run stops with exit code 3 and one line. No checkpoint is written with a
non-finite parameter. On that stop, the checkpoints that hold the parameters the skipped steps
started from go to WORKDIR/checkpoints_diverged/: resumed, they would meet the same batches and
skip again at any learning rate (a gradient does not depend on it). Re-running the command (with
a lower lr, say) resumes from the last checkpoint before them.

The in-a-row count is `TrainState.skips`, kept on the device and saved with the checkpoint: a
step needs no host sync. train.py reads it when it fetches anything anyway (at log steps, with
the metrics) and at save steps, so a run may go on skipping for up to `log_every` steps before
it stops; those steps change no parameter.
"""
import jax
import jax.numpy as jnp
import numpy as np

EXIT_CODE = 3


def all_finite(tree) -> jax.Array:
  """bool scalar: every element of every floating-point leaf of `tree` is finite."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def keep_if(ok: jax.Array, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (pytrees of one structure; no branch, so it works
  inside the sharded step and on optax's masked states, whose frozen parts have no leaves)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


_all_finite = jax.jit(all_finite)


def params_finite(params) -> bool:
  """Whether every parameter is finite (a host sync: one reduction, fetched; at save steps only).
  The same answer on every host, so all of them save or refuse together."""
  return bool(_all_finite(params))


class Monitor:
  """The host side: remembers the last finite loss it saw and says when to stop."""

  def __init__(self, config):
    self.limit = config.optimizer.max_skipped_steps
    self.lr, self.grad_clip = config.optimizer.lr, config.optimizer.grad_clip
    self.last_loss = None      # (step, loss): the last finite loss seen

  def saw(self, step: int, interval: list):
    """The per-step metrics of the logged interval ending at `step` (fetched already by
    metrics.summarize: cached)."""
    first = step - len(interval) + 1
    finite = [(first + i, float(m["loss"])) for i, m in enumerate(jax.device_get(interval)) if np.isfinite(m["loss"])]
    if finite:
      self.last_loss = finite[-1]

  def check(self, step: int, state, interval: list, ckpt) -> str | None:
    """None while the run may go on. When `state` (after `step`) has hit the limit of skipped
    steps in a row: sets aside the checkpoints that hold the parameters those steps started from
    (every step of a streak reproduces on them at any lr: the same parameters and batches) and
    returns the one line to stop with. Reads one device scalar; `interval`: the metrics not
    logged yet; `ckpt`: the run's checkpoint.Checkpointer."""
    skips = int(state.skips)
    if skips < self.limit:
      return None
    if interval:
      self.saw(step, interval)
    last_applied = step - skips        # the parameters have not changed since this step
    moved = ckpt.set_aside(last_applied)
    latest = ckpt.latest_step()
    loss = "none seen" if self.last_loss is None else f"{self.last_loss[1]:.4g} (step {self.last_loss[0]})"
    clip = f"{self.grad_clip:g}" + (": off" if not self.grad_clip else "")
    resume = f"it resumes from step {latest}" if latest else "it starts over (no checkpoint left)"
    aside = (f" (the checkpoints of the skipped steps' parameters, step {', '.join(map(str, moved))}, are in "
             "checkpoints_diverged/)") if moved else ""
    return (f"diverged at step {step}: {skips} steps in a row (optimizer.max_skipped_steps={self.limit}) had a "
            f"non-finite loss, gradient norm or update and were skipped; last finite loss {loss}. Lower "
            f"optimizer.lr (now {self.lr:g}) or set optimizer.grad_clip (now {clip}), then re-run the command: "
            f"{resume}{aside}")
