"""Functional ops: colour space conversions and integer kernels."""
