"""Evaluation: zero-shot classification with descriptions, retrieval and grounding.

from grain_jax.eval import classify, ground, run_evaluation
"""

from grain_jax.eval.grounding import ground
from grain_jax.eval.run import run_evaluation
from grain_jax.eval.zeroshot import classify

__all__ = ["classify", "ground", "run_evaluation"]
