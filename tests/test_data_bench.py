"""The data benchmark runs end to end (tiny sizes; the real figures come from its defaults)."""

from grain_jax.bench import data


def test_data_benchmark_runs(capsys):
  argv = ["--num-records", "12", "--stored-size", "48", "--image-size", "32", "--batch-size", "4",
          "--num-batches", "2", "--workers", "0"]
  assert data.main(argv) == 0
  out = capsys.readouterr().out
  assert "examples per CPU-second" in out and "per CPU-s" in out
