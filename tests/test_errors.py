"""Errors a user causes are one message and exit status 2 in every command-line tool, the traceback
only with GRAIN_JAX_TRACEBACK=1; URLs are refused where a local path is needed."""

import json
import os
import re
import subprocess
import sys

import pytest

from grain_jax import config as config_lib
from grain_jax import errors, files
from grain_jax.annotate import __main__ as annotate_cli
from grain_jax.config import base, validation
from grain_jax.data import quality, records
from grain_jax.torch_format import from_torch, layout
from grain_jax.train import checkpoint

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/base.py:tiny"]


def test_the_project_errors_are_user_errors():
  for error in (
    config_lib.ConfigError,
    quality.BadDataError,
    errors.BadFileError,
    errors.ArgumentError,
    errors.RemotePathError,
    checkpoint.CheckpointMismatchError,
    checkpoint.CheckpointReadError,
    checkpoint.NoReadableCheckpointError,
    layout.LayoutMismatchError,
  ):
    assert issubclass(error, errors.USER_ERRORS), error


def test_run_command_prints_a_user_error_and_lets_others_through(capsys, monkeypatch):
  def fails(error):
    def body():
      raise error

    return body

  assert errors.run_command(lambda: None) == 0
  assert errors.run_command(fails(quality.BadDataError("too many bad records"))) == errors.USER_ERROR_STATUS
  assert capsys.readouterr().err == "error: too many bad records\n"
  with pytest.raises(KeyError):
    errors.run_command(fails(KeyError("a bug")))
  monkeypatch.setenv(errors.TRACEBACK_VARIABLE, "1")
  with pytest.raises(quality.BadDataError):
    errors.run_command(fails(quality.BadDataError("too many bad records")))


@pytest.mark.parametrize(
  "path, hint",
  [
    (
      "gs://my-bucket/runs/a",
      "mount the bucket (launch/mount_bucket.sh my-bucket mounts it at /gcs/my-bucket) and use /gcs/my-bucket/runs/a",
    ),
    ("s3://bucket/x", "mount the storage as a file system and use the mounted path"),
    ("file:///tmp/x", "mount the storage as a file system and use the mounted path"),
  ],
)
def test_urls_are_refused(path, hint):
  message = (
    f"--out={path!r} is a URL, but grain-jax reads and writes this through local paths only (only "
    f"--workdir and --output-dir may be gs:// URLs): {hint}"
  )
  with pytest.raises(errors.RemotePathError, match=f"^{re.escape(message)}$"):
    errors.check_local_path(path, "--out")
  for local in ("runs/a", "/gcs/my-bucket/runs/a", "gs:/not-a-url", ""):
    errors.check_local_path(local, "--out")


@pytest.mark.parametrize("path", ["s3://bucket/x", "file:///tmp/x", "gs://", "gs:///runs"])
def test_a_workdir_is_local_or_in_a_gcs_bucket(path):
  with pytest.raises(
    errors.RemotePathError,
    match=re.escape(f"--workdir={path!r}: it must be a local path or a bucket's gs://BUCKET/PATH"),
  ):
    files.check_location(path, "--workdir")
  for workdir in ("runs/a", "/gcs/my-bucket/runs/a", "gs://my-bucket/runs/a", "gs://my-bucket", ""):
    files.check_location(workdir, "--workdir")


@pytest.mark.parametrize("field", validation.PATH_FIELDS)
def test_validate_refuses_a_url_in_a_path_field(field):
  config = base.get_config("tiny")
  section, name = field.split(".")
  config[section][name] = "gs://my-bucket/x.safetensors"
  with pytest.raises(errors.RemotePathError, match=f"config.{field}='gs://my-bucket/x.safetensors' is a URL"):
    config_lib.validate(config)


@pytest.mark.extras
def test_an_unreadable_safetensors_file_is_named(tmp_path):
  pytest.importorskip("safetensors", reason="reading .safetensors needs the export extra: requirements-export.txt")
  path = tmp_path / "init.safetensors"
  path.write_bytes(os.urandom(64))
  with pytest.raises(errors.BadFileError, match=f"{path} is not a readable safetensors file"):
    from_torch.read_checkpoint(str(path))


def _bad_datasets(tmp_path) -> dict[str, str]:
  """A record dataset whose manifest is not JSON, and one whose shard is not an ArrayRecord file."""
  not_json, garbage = tmp_path / "not_json", tmp_path / "garbage"
  not_json.mkdir()
  (not_json / records.MANIFEST).write_text("{not json")
  garbage.mkdir()
  (garbage / records.MANIFEST).write_text(
    json.dumps({"schema_version": records.SCHEMA_VERSION, "shards": [{"file": records.shard_name(0), "count": 3}]})
  )
  (garbage / records.shard_name(0)).write_bytes(os.urandom(300))
  return {"not_json": str(not_json), "garbage": str(garbage)}


# Each case fails before anything compiles: (arguments, the message's pattern).
def _main_cases(tmp_path) -> dict[str, tuple[list[str], str]]:
  data = _bad_datasets(tmp_path)
  (tmp_path / "a_file").write_text("")
  return {
    "unknown field": (
      [*TINY, "--workdir", str(tmp_path / "run"), "--config.model.decoder.dpth=3"],
      r"command line: config\.model\.decoder\.dpth is not a known field \(known in "
      r"config\.model\.decoder: anchor_queries, .*depth, ",
    ),
    "unknown preset": (
      ["--config", "configs/base.py:huge", "--workdir", str(tmp_path / "run")],
      r"config\.model preset 'huge' is unknown; choose one of",
    ),
    "missing config file": (
      ["--config", "configs/missing.py:tiny", "--workdir", str(tmp_path / "run")],
      r"config file 'configs/missing.py' does not exist",
    ),
    "url workdir": (
      [*TINY, "--workdir", "s3://my-bucket/runs/a"],
      r"--workdir='s3://my-bucket/runs/a': it must be a local path or a bucket's gs://BUCKET/PATH",
    ),
    "url output dir": (
      [*TINY, "--workdir", str(tmp_path / "run_url_output"), "--mode", "eval", "--output-dir", "s3://my-bucket/eval"],
      r"--output-dir='s3://my-bucket/eval': it must be a local path or a bucket's gs://BUCKET/PATH",
    ),
    "url in config": (
      [*TINY, "--workdir", str(tmp_path / "run"), "--config.data.train_dir=s3://bucket/x"],
      r"config\.data\.train_dir='s3://bucket/x' is a URL",
    ),
    "workdir under a file": (
      [*TINY, "--workdir", str(tmp_path / "a_file" / "run")],
      r"Not a directory: '.*a_file/run'",
    ),
    "manifest not json": (
      [*TINY, "--workdir", str(tmp_path / "run_not_json"), f"--config.data.train_dir={data['not_json']}"],
      r"not_json/manifest\.json is not valid JSON",
    ),
    "garbage shard": (
      [*TINY, "--workdir", str(tmp_path / "run_garbage"), f"--config.data.train_dir={data['garbage']}"],
      r"garbage/shard-00000\.array_record is not a readable ArrayRecord file",
    ),
    "bound": (
      [*TINY, "--workdir", str(tmp_path / "run_bound"), "--config.train.keep_checkpoints=0"],
      r"^error: config\.train\.keep_checkpoints=0 must be at least 1$",
    ),
    "output dir in training": (
      [*TINY, "--workdir", str(tmp_path / "run_output"), "--output-dir", str(tmp_path / "out")],
      r"--output-dir is for --mode eval and --mode export",
    ),
  }


@pytest.fixture(scope="module")
def main_results(tmp_path_factory):
  """Every case of _main_cases run by `python -m grain_jax.main`, all at once (mostly imports):
  name -> (pattern, exit status, stderr, workdir)."""
  tmp_path = tmp_path_factory.mktemp("main")
  cases = _main_cases(tmp_path)
  cases["traceback"] = (cases["unknown field"][0], "")
  processes = {}
  for name, (args, _) in cases.items():
    env = dict(os.environ, **({errors.TRACEBACK_VARIABLE: "1"} if name == "traceback" else {}))
    processes[name] = subprocess.Popen(
      [sys.executable, "-m", "grain_jax.main", *args],
      cwd=REPOSITORY,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  results = {}
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    args = cases[name][0]
    results[name] = (cases[name][1], process.returncode, stderr, args[args.index("--workdir") + 1])
  assert not os.path.exists(os.path.join(REPOSITORY, "gs:"))
  return results


@pytest.mark.integration
@pytest.mark.parametrize(
  "name",
  [
    "unknown field",
    "unknown preset",
    "missing config file",
    "url workdir",
    "url in config",
    "workdir under a file",
    "manifest not json",
    "garbage shard",
    "bound",
    "output dir in training",
    "url output dir",
  ],
)
def test_main_reports_a_user_error_in_one_message(main_results, name):
  pattern, status, stderr, _ = main_results[name]
  assert status == errors.USER_ERROR_STATUS, stderr[-3000:]
  assert "Traceback" not in stderr
  message = stderr.rstrip("\n").splitlines()[-1]
  assert message.startswith("error: ") and re.search(pattern, message), stderr[-3000:]


@pytest.mark.integration
def test_a_run_that_fails_leaves_no_empty_workdir(main_results):
  """Config errors stop before the workdir is made; data errors come after it was made, and the run
  removes it again as long as it holds no file."""
  for name in (
    "unknown field",
    "unknown preset",
    "url in config",
    "manifest not json",
    "garbage shard",
    "bound",
    "output dir in training",
  ):
    workdir = main_results[name][3]
    assert not os.path.exists(workdir), name


def test_main_shows_the_traceback_when_asked(main_results):
  _, status, stderr, _ = main_results["traceback"]
  assert status not in (0, errors.USER_ERROR_STATUS)
  assert "Traceback" in stderr and "config.model.decoder.dpth is not a known field" in stderr


def test_the_annotator_reports_a_user_error_in_one_message(tmp_path, capsys):
  out = str(tmp_path / "out")
  assert annotate_cli.main(["--images", str(tmp_path / "missing"), "--out", out]) == errors.USER_ERROR_STATUS
  assert capsys.readouterr().err == f"error: --images {tmp_path / 'missing'} is not a directory\n"
  assert annotate_cli.main(["--images", str(tmp_path), "--out", "gs://my-bucket/shards"]) == errors.USER_ERROR_STATUS
  assert capsys.readouterr().err.startswith("error: --out='gs://my-bucket/shards' is a URL")
  assert not os.path.exists(out)
