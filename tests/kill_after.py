"""Fault injection: run train.py as a user would, then SIGKILL the process right after a step.

  python tests/kill_after.py STEP train.py [train.py's flags ...]

Like a host lost mid-run: after step STEP's checkpoint call returns (and any save it started has
finished, so the test knows which checkpoint survives), the process dies with no clean-up.
"""
import os
import runpy
import signal
import sys

from trainer import checkpoint


def kill_after(step: int) -> None:
  save = checkpoint.Checkpointer.save

  def save_then_die(self, at_step, *args, **kwargs):
    save(self, at_step, *args, **kwargs)
    if at_step == step:
      self.wait()
      os.kill(os.getpid(), signal.SIGKILL)
  checkpoint.Checkpointer.save = save_then_die


if __name__ == "__main__":
  kill_after(int(sys.argv[1]))
  sys.argv = sys.argv[2:]
  runpy.run_path(sys.argv[0], run_name="__main__")
