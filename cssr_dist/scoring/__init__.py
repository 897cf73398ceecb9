"""Open-set scores (S0/S1/S2/integrated, MSP/MLS/energy) and their training-set statistics."""

from .scores import SCORE_REGISTRY, Scorer, compute_scores, primary_score, register_score
from .statistics import ScoreStatistics

__all__ = ["SCORE_REGISTRY", "ScoreStatistics", "Scorer", "compute_scores", "primary_score", "register_score"]
