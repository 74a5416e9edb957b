"""What a sweep runs: its points, each a dict {config field: value} of overrides on one config.

Points come from `--sweep FIELD=V1,V2,...` flags (their product, the first flag outermost) or, when
there are none, from the config file's `sweep()` (big_vision style: a list of override dicts;
`sweep(arg)` for `configs/x.py:arg`). Each point runs in WORKDIR/<name>, the name made from its
overrides (`slc_block=32,num_selected=8`)."""
import ast
import hashlib
import importlib.util
import itertools
import os
import re

import ml_collections


class SweepError(ValueError):
  """A sweep that cannot be run as asked (scripts/sweep.py prints it and exits 2)."""


def parse_value(text: str):
  """'32' -> 32, '1e-3' -> 0.001, 'True' -> True, 'nsa' -> 'nsa' (anything else stays text)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_axis(spec: str) -> tuple[str, list]:
  """'nsa.slc_block=32,64,128' -> ('nsa.slc_block', [32, 64, 128])."""
  field, sep, values = spec.partition("=")
  field = field.strip().removeprefix("config.")
  items = [parse_value(v.strip()) for v in values.split(",")] if values.strip() else []
  if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", field) or not items or "" in items:
    raise SweepError(f"--sweep {spec!r}: write FIELD=V1,V2,..., e.g. --sweep nsa.slc_block=32,64,128")
  if len(set(map(repr, items))) < len(items):
    raise SweepError(f"--sweep {spec!r}: a value is listed twice")
  return field, items


def product(axes: list[tuple[str, list]]) -> list[dict]:
  """The grid of (field, values) axes, the first axis outermost; [{}] for no axes."""
  fields = [f for f, _ in axes]
  if len(set(fields)) < len(fields):
    raise SweepError(f"--sweep: a field is swept twice ({', '.join(fields)})")
  return [dict(zip(fields, values)) for values in itertools.product(*(v for _, v in axes))]


def load_config_file(spec: str):
  """'configs/x.py[:arg]' -> (module, arg or None), as ml_collections' config_flags loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"--config={spec}: no such file")
  module_spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg or None


def base_config(module, arg) -> ml_collections.ConfigDict:
  return module.get_config(arg) if arg is not None else module.get_config()


def file_points(module, arg, spec: str) -> list[dict] | None:
  """The config file's sweep() points, or None when it defines no sweep()."""
  if not hasattr(module, "sweep"):
    return None
  points = module.sweep(arg) if arg is not None else module.sweep()
  if not isinstance(points, (list, tuple)) or not points or not all(
      isinstance(p, dict) and all(isinstance(k, str) for k in p) for p in points):
    raise SweepError(f"--config={spec}: sweep() must return a non-empty list of {{FIELD: VALUE}} dicts")
  return [{k.removeprefix("config."): v for k, v in p.items()} for p in points]


def choose(file_pts: list[dict] | None, grid: list[dict]) -> list[dict]:
  """The --sweep grid if there is one (the command line overrides the file), else the file's points."""
  points = grid if grid != [{}] else file_pts
  if not points or points == [{}]:
    raise SweepError("nothing to sweep: give --sweep FIELD=V1,V2,... or a config file that defines sweep()")
  seen = set()
  for p in points:
    if (key := repr(sorted(p.items()))) in seen:
      raise SweepError(f"the point {p} is listed twice")
    seen.add(key)
  return points


def get_field(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def check_fields(config, points: list[dict], fixed: dict) -> None:
  """Every swept field exists in the config and is not also fixed by a --config.FIELD override."""
  for field in fields_of(points):
    try:
      node = get_field(config, field)
    except (KeyError, AttributeError, TypeError):
      raise SweepError(f"--sweep {field}: no such config field (see configs/base.py)") from None
    if isinstance(node, ml_collections.ConfigDict):
      raise SweepError(f"--sweep {field}: a group of fields, not a field")
    if field in fixed:
      raise SweepError(f"--sweep {field}: also given as --config.{field}={fixed[field]}")


def apply(config, overrides: dict):
  """Sets each field of `overrides` on `config` (a ConfigDict) in place; returns it."""
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def fields_of(points: list[dict]) -> list[str]:
  """The swept fields, in order of first appearance."""
  return list(dict.fromkeys(f for p in points for f in p))


def flag_value(value) -> str:
  """A value as train.py's --config.FIELD=VALUE takes it."""
  return str(value)


def names(points: list[dict]) -> list[str]:
  """A short directory name per point from its overrides: the fields' last parts (the full name
  where two swept fields share one) and values, e.g. 'slc_block=32,num_selected=8'."""
  fields = fields_of(points)
  leaves = [f.rsplit(".", 1)[-1] for f in fields]
  short = {f: (leaf if leaves.count(leaf) == 1 else f) for f, leaf in zip(fields, leaves)}
  out = []
  for p in points:
    name = ",".join(f"{short[f]}={re.sub(r'[^A-Za-z0-9._+-]', '_', flag_value(v))}" for f, v in p.items())
    if len(name) > 120:         # a stable short hash keeps long names unique across runs
      name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    while name in out:          # two points whose values differ only in replaced characters
      name += "_"
    out.append(name)
  return out
