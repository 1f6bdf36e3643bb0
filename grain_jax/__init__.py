"""grain-jax: GRAIN (Grounding Descriptions in Images) pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"
