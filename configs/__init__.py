"""Configs are code: base.py holds every field; presets (tiny, small, 1b, 7b) override a few."""


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse_flags(argv, config_flag=None) -> str | None:
  """Parses absl flags (with an ml_collections `config_flag`, if the script has one); returns the
  one-line error for an unknown flag or config field, a bad value or a config file that cannot be
  loaded, else None. -h/--help prints the script's docstring and flags and exits 0 (absl's parser
  alone would call it an unknown flag)."""
  import sys

  from absl import flags
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(f"{(sys.modules['__main__'].__doc__ or '').strip()}\n\nflags:\n{flags.FLAGS.main_module_help()}")
    sys.exit(0)
  try:
    flags.FLAGS(argv)
    if config_flag is not None and config_flag.value is not None:
      config_flag.value.to_dict()   # config_flags defers a bad --config path until first use
      from ml_collections import config_flags

      from configs import hf  # init_from=hf:DIR: the architecture from DIR's config.json
      hf.resolve(config_flag.value, config_flags.get_override_values(flags.FLAGS[config_flag.name]))
  except ConfigError as e:
    return str(e)
  except (AttributeError, KeyError) as e:
    return f"error: unknown config field {str(e).strip(chr(34))} on the command line"
  except OSError as e:   # the config file itself: say why it could not be loaded
    return f"error: --config cannot be loaded: {str(e).strip().splitlines()[-1].strip()}"
  except flags.Error as e:
    return f"error: {str(e).splitlines()[0]}"
  return None


class ConfigError(ValueError):
  """A config value that cannot work: names the field, the value and what is allowed."""

  def __init__(self, field: str, value, allowed: str):
    super().__init__(f"config error: {field}={value!r}: {allowed}")
    self.field = field


def max_docs_per_row(config) -> int | None:
  """The documents a packed row may hold, resolved from the config: data.max_docs_per_row, or
  when it is 0 (auto) for NSA max(4, seq_len / (8 slc_block)), so that NSA's block-aligned row
  (model/packing.py) is at most ~1/8 longer; None: no limit. The data pipeline packs to it and
  the model lays rows out for it, so both read it here."""
  if config.data.max_docs_per_row:
    return config.data.max_docs_per_row
  if config.attention.kind == "nsa":
    return max(4, config.seq_len // (8 * config.nsa.slc_block))
  return None
