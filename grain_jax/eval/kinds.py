"""The evaluation kinds (grain_jax/eval/evaluator.py's shape), in the order they run and are listed in
results.json, the printed table and comparisons."""

from grain_jax.eval.attention import AttentionMaps
from grain_jax.eval.classification import Classification
from grain_jax.eval.grounding import Grounding
from grain_jax.eval.probe import Probes
from grain_jax.eval.retrieval import Retrieval

KINDS = (Classification, Retrieval, Grounding, AttentionMaps, Probes)
