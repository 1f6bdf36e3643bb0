"""The one shape of an evaluation kind: built from a config entry, run on a model, shown as rows.

  evaluator = Kind(entry, context)        # reads the set an entry of `Kind.entries(config.eval)` names
  result = evaluator.run(model, runner)   # results.json's results[Kind.section][evaluator.name]
  Kind.table_rows(results)                # the printed table's rows of every set of the kind
  Kind.compared(results)                  # the rows experiments compare, with what no skill scores

The kinds, in the order they run and are listed: grain_jax/eval/kinds.py; the formatter:
grain_jax/eval/table.py.
"""

import abc
import dataclasses
import os
from typing import ClassVar, NamedTuple

import ml_collections

from grain_jax.eval import text_cache
from grain_jax.eval.runner import Runner


class Row(NamedTuple):
  """One line of the printed table: the set, what was measured, the value as printed."""

  set: str
  metric: str
  cell: str


class Compared(NamedTuple):
  """One row of a comparison of runs: its label, the value (%) and what no skill scores there (%; None
  where that is unknown)."""

  label: str
  value: float
  no_skill: float | None


@dataclasses.dataclass
class Context:
  """What the evaluators of one `run_evaluation` share.

  config: the full config (`eval`, `model`, `data`), validated.
  workdir: the run's directory: the synthetic sets and the training data (fixed boxes) are found from it.
  out_dir: where pictures go, under `<out_dir>/<section>/<set>/`; "" on the processes that write none.
  settings: `protocol.settings(config.eval)`, the zero-shot protocol's effective settings.
  text_cache: the class text embeddings of the model's text tower.
  fitted_boxes: grounding's image-blind fixed boxes, fitted once per training data folder.
  grounding_sets: the grounding sets read so far (entry -> (name, set)), which grounding and the
    attention maps both score.
  """

  config: ml_collections.ConfigDict
  workdir: str
  out_dir: str
  settings: dict
  text_cache: text_cache.TextCache
  fitted_boxes: dict = dataclasses.field(default_factory=dict)
  grounding_sets: dict = dataclasses.field(default_factory=dict)

  def picture_dir(self, section: str, name: str) -> str:
    """Where set `name` of `section` writes its pictures ("" when this process writes none)."""
    return os.path.join(self.out_dir, section, name) if self.out_dir else ""


class Evaluator(abc.ABC):
  """An evaluation kind: one instance per set it evaluates."""

  section: ClassVar[str]  # the kind's key in results.json: {section: {set name: result}}
  name: str  # the set's name under it

  @staticmethod
  @abc.abstractmethod
  def entries(eval_config) -> tuple[str, ...]:
    """The entries of `config.eval` this kind evaluates, one set each."""

  @abc.abstractmethod
  def __init__(self, entry: str, context: Context):
    """Prepares the set `entry` names: reads it (at most `config.eval.max_examples` images) or locates it."""

  @abc.abstractmethod
  def run(self, model, runner: Runner) -> dict:
    """The set's result (JSON-serializable) for `model` in eval mode."""

  @staticmethod
  @abc.abstractmethod
  def table_rows(results: dict) -> list[Row]:
    """The printed table's rows of this kind's sets in `results` (run_evaluation's)."""

  @staticmethod
  @abc.abstractmethod
  def compared(results: dict) -> list[Compared]:
    """The rows a comparison of runs shows for this kind's sets in `results`."""


def scored_rows(section: dict) -> list[Row]:
  """The rows of a section whose results hold {"rows": {metric: %}, "no_skill": {metric: %}}."""
  return [
    Row(name, metric, f"{value:.1f} (no skill {result['no_skill'][metric]:.1f})")
    for name, result in section.items()
    for metric, value in result["rows"].items()
  ]


def scored_compared(section: dict) -> list[Compared]:
  """`scored_rows`' metrics as compared rows, each labelled with its set."""
  return [
    Compared(f"{name} {metric}", value, result["no_skill"][metric])
    for name, result in section.items()
    for metric, value in result["rows"].items()
  ]
