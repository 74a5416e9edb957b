"""perf.chips: one chip table and one accelerator-name parser, the same for every script."""
import pytest

from perf.chips import CHIPS, parse_accelerator
from scripts import aot_compile, launch_tpu


def test_accelerator_types_map_to_the_slices_cloud_tpu_offers():
  """name -> (topology, chips, hosts): v4/v5p names count TensorCores, v5e/v6e names count chips."""
  expected = {
      "v5p-8": ("v5p:2x2x1", 4, 1), "v5p-16": ("v5p:2x2x2", 8, 2), "v5p-24": ("v5p:2x2x3", 12, 3),
      "v5p-32": ("v5p:2x2x4", 16, 4), "v5p-64": ("v5p:2x4x4", 32, 8), "v5p-128": ("v5p:4x4x4", 64, 16),
      "v5p-256": ("v5p:4x4x8", 128, 32), "v4-8": ("v4:2x2x1", 4, 1), "v4-64": ("v4:2x4x4", 32, 8),
      "v5litepod-1": ("v5e:1x1", 1, 1), "v5e-4": ("v5e:2x2", 4, 1), "v5litepod-8": ("v5e:2x4", 8, 1),
      "v5litepod-16": ("v5e:4x4", 16, 4), "v6e-16": ("v6e:4x4", 16, 4), "v6e-32": ("v6e:4x8", 32, 8),
      "v6e-64": ("v6e:8x8", 64, 16), "v6e-256": ("v6e:16x16", 256, 64), "v5p:4x4x2": ("v5p:4x4x2", 32, 8),
      "v5e:2x2": ("v5e:2x2", 4, 1)}
  got = {name: (a.topology, a.chips, a.hosts) for name in expected if (a := parse_accelerator(name))}
  assert got == expected
  assert parse_accelerator("v5e-16").name == "v5litepod-16" and parse_accelerator("v5p:2x4x4").name == "v5p-64"
  for bad in ("v9-8", "v5p-12", "v5p-4", "v6e-512", "v5e-2", "v5p:2x2", "v6e:2x2x1", "tpu"):
    assert parse_accelerator(bad) is None, bad


def test_facts_come_from_the_one_table():
  a = parse_accelerator("v6e-256")
  assert a.facts is CHIPS["v6e"] and a.facts.mxu == 256 and a.generation == "v6e"
  assert parse_accelerator("v5litepod-16").generation == "v5litepod" and parse_accelerator("v5p-24").facts.cores == 2
  assert CHIPS["v5p"].ridge == pytest.approx(459 / 2.76)


@pytest.mark.parametrize("name", ["v5p-24", "v5litepod-16", "v6e-256", "v4-8"])
def test_every_script_reads_names_through_the_same_parser(name):
  """The launcher and the AOT fit check take the same names to the same slice (no second parser)."""
  assert launch_tpu.parse_accelerator is parse_accelerator and aot_compile.parse_accelerator is parse_accelerator
  assert launch_tpu.parse([*"run --name r --zone z --project p --config configs/tiny.py --workdir gs://b/r".split(),
                           "--tpu", name]).tpu_info == parse_accelerator(name)


def test_no_second_chip_table():
  """Peak FLOP/s and HBM bandwidth are written once: no other module spells a chip's numbers."""
  from conftest import REPO
  facts = ("918", "459", "2.76", "1.64", "0.82")
  for path in [*REPO.glob("*/*.py"), *REPO.glob("*/*/*.py")]:
    if path.name == "chips.py" or path.parent.name == "tests":
      continue
    code = path.read_text()
    assert not [f for f in facts if f in code], path
