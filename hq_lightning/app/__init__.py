"""Helpers of the Hydra app (``hq_lightning.cli``): config schema, qconfig builder, reports.

This package imports Hydra and OmegaConf; the core package never imports it.
"""
