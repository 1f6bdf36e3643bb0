"""The train-step benchmark runs and reports its figures."""

from grain_jax.bench import step


def test_step_benchmark_prints_its_figures(capsys):
  assert step.main(["--config", "configs/base.py:tiny", "--batch", "8", "--steps", "1", "--scan_layers", "true"]) == 0
  out = capsys.readouterr().out
  for figure in ("layers scanned", "step: median", "images/s", "GFLOP/s", "utilization", "finite: True"):
    assert figure in out
