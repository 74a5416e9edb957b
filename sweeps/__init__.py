"""Sweeps: grids of config fields run as train.py processes, and their results table and plots."""
