"""Open-set scores (S0/S1/S2/integrated, MSP/MLS/energy) and their training-set statistics."""

from cssr_dist.scoring.scores import SCORE_REGISTRY, compute_scores, register_score
from cssr_dist.scoring.statistics import ScoreStatistics

__all__ = ["SCORE_REGISTRY", "ScoreStatistics", "compute_scores", "register_score"]
