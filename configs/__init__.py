"""Configs are code: base.py holds every field; presets (tiny, small, 1b, 7b) override a few."""


class ConfigError(ValueError):
  """A config value that cannot work: names the field, the value and what is allowed."""

  def __init__(self, field: str, value, allowed: str):
    super().__init__(f"config error: {field}={value!r}: {allowed}")
    self.field = field
