"""Continuous batching over one device's pipeline (engine.py), with per-sequence sampling
(sampling.py), incremental detokenizing and stop strings (detok.py), and context fitting (context.py)."""
