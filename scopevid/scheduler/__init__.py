"""WHEN and WHERE to compute: rollout plans, step policies and velocity predictors.

Pure and deterministic: no model, no I/O, no torch.distributed. Plans are plain dataclasses.
"""
