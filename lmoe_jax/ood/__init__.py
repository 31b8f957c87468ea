"""OOD detection: scores (higher = more ID), fitted statistics, metrics and reports.

``lmoe_jax.evaluate`` joins them into the evaluation every run ends with.
"""
from lmoe_jax.ood import fitting, metrics, report, scores, sources
from lmoe_jax.ood.sources import EvalSet

__all__ = ['EvalSet', 'fitting', 'metrics', 'report', 'scores', 'sources']
