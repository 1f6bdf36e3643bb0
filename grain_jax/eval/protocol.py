"""Evaluation protocols: the zero-shot settings a user selects by one name (`config.eval.protocol`).

  authors   what the authors' evaluation computes: their 46 templates on every set, each class vector
            the plain mean of its normalized prompt embeddings (not renormalized), the global score
            alone (their alpha = 1) as the reported number; their region score alongside.
  ours      OpenAI's 80 templates, renormalized class vectors, and every head a model can run, so
            that models are compared on the same texts.

A field set in `config.eval` (templates, renormalize, heads, alpha) overrides the protocol's value;
results name the protocol and every field that departs from it.
"""

from grain_jax.eval import heads as heads_lib

FIELDS = ("templates", "renormalize", "heads", "alpha")
PROTOCOLS = {
  "authors": dict(
    templates="birds", renormalize=False, heads=("names/global", heads_lib.PAPER_HEAD, "descriptors/region"), alpha=1.0
  ),
  "ours": dict(templates="clip", renormalize=True, heads=heads_lib.HEADS, alpha=0.5),
}


def settings(cfg) -> dict:
  """The effective settings of the eval section `cfg` (checked by grain_jax/config/eval_rules.py): its
  protocol's, with the fields `cfg` sets.

  Returns:
    {"protocol", "templates", "renormalize", "heads", "alpha", "departures": {field: value}}.
  """
  chosen = dict(PROTOCOLS[cfg.protocol])
  departures = {field: cfg[field] for field in FIELDS if cfg[field] is not None and cfg[field] != chosen[field]}
  chosen.update(departures)
  chosen["heads"] = tuple(chosen["heads"])
  return {"protocol": cfg.protocol, **chosen, "departures": departures}
