"""Chip facts and the models of what a kernel costs on them (traffic, time)."""
