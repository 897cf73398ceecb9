"""Evaluation: metrics (pure numpy functions, ``metrics.py``) and the evaluation loop."""
