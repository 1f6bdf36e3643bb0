"""The train-step benchmark runs and reports its figures, and the reference's step beside ours when
torch is installed."""

import importlib.util

from grain_jax.bench import step

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_step_benchmark_prints_its_figures(capsys):
  reference = "true" if HAVE_TORCH else "false"
  assert (
    step.main(
      [
        "--config",
        "configs/base.py:tiny",
        "--batch",
        "8",
        "--steps",
        "2",
        "--scan-layers",
        "true",
        "--reference",
        reference,
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  figures = [
    "layers scanned",
    "8 captions and 40 descriptions packed into",
    "one pass of the text tower",
    "step: median",
    "images/s",
    "GFLOP/s",
    "G per image",
    "utilization",
    "MFU: no bf16 peak known",
    "finite: True",
  ]
  if HAVE_TORCH:
    figures += ["reference step (PyTorch", "alternating with ours", "speedup over the reference:", "per pair of steps"]
  for figure in figures:
    assert figure in out
