"""Evaluation results as rows: the printed table, and the rows comparisons of runs compare.

Every kind (grain_jax/eval/kinds.py) names its own rows (`table_rows`, `compared`); this lays them out.
"""

from grain_jax.eval.kinds import KINDS


def format_table(results: dict) -> str:
  """`run_evaluation`'s results as an aligned plain-text table (top-1 %, R@1 %, box recall %, ...) under
  a line naming the protocol."""
  settings = results["settings"]
  departures = "".join(f", {k}={v}" for k, v in settings["departures"].items())
  header = f"protocol {settings['protocol']}{departures}; the paper's number is {settings['paper_head']} (paper)"
  rows = [("set", "metric", "value"), *(row for kind in KINDS for row in kind.table_rows(results))]
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return header + "\n" + "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def headline_metrics(results: dict) -> tuple[dict[str, float], dict[str, float]]:
  """The rows a comparison of runs shows (%), and what no skill scores on each where that is known:
  label -> value, label -> no skill."""
  compared = [row for kind in KINDS for row in kind.compared(results)]
  return (
    {row.label: row.value for row in compared},
    {row.label: row.no_skill for row in compared if row.no_skill is not None},
  )
