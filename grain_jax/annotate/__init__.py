"""The annotation pipeline: an MLLM describes each image, an open-vocabulary detector boxes the
descriptions, and the results are written as record shards (python -m grain_jax.annotate).

torch and transformers are optional (requirements-annotate.txt) and imported only when a model
is loaded.
"""
