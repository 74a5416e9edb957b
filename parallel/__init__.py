"""Mesh and parallelism: the mesh builder, the logical-axis rules, context parallelism's layout and
the per-device placement of kernels. Imports nothing else of the project."""
