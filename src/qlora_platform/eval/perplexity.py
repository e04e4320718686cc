"""Kept for callers that import the scoring functions from here; they live in models.scoring."""

from ..models.scoring import holdout_perplexity, summed_answer_nll

__all__ = ["holdout_perplexity", "summed_answer_nll"]
