"""Test session setup: 8 simulated CPU devices so sharded runs can be compared with one device, one
compilation cache for the session, and XLA's backend optimizations off.

Many tests build the same tiny step anew (a resumed run, the processes of a multi-process launch):
the persistent cache, inherited by subprocesses through the environment, compiles each program once.
The tests' models are tiny, so compiling is most of their time: without LLVM's optimizations the
train step compiles in half the time and runs about as fast.

Helpers more than one test module needs live here too (`from conftest import png_bytes`), beside the
fixtures. Tests are unit tests unless their module is marked `pytestmark = pytest.mark.integration`
(several processes, subprocess runs of the command line, the emulated bucket, the launch scripts):
`pytest -q -m "not integration"` is the fast loop.
"""

import atexit
import errno
import io
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="grain_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# jax reads the settings above when it is imported.
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

# The launcher's command for two processes of two CPU devices each; grain_jax.main's flags follow.
TWO_PROCESSES = ["bash", "launch/local_multiprocess.sh", "--processes", "2", "--devices-per-process", "2", "--"]


def tiny_run_flags(steps: int, examples: int = 2) -> list[str]:
  """grain_jax.main's flags for a run a subprocess test can afford: the tiny preset, batches of 8 from 32
  synthetic scenes, `steps` steps each logged, no evaluation; `examples` retrieval and grounding scenes."""
  return [
    "--config",
    "configs/base.py:tiny",
    "--config.data.batch_size=8",
    f"--config.train.num_steps={steps}",
    "--config.train.log_every=1",
    "--config.experiment.evaluate=False",
    "--config.optim.warmup_steps=1",
    "--config.data.synthetic.num_train=32",
    "--config.data.synthetic.images_per_class=1",
    f"--config.data.synthetic.num_retrieval={examples}",
    f"--config.data.synthetic.num_grounding={examples}",
  ]


# How long a test waits for a subprocess (a training run, a launcher) before killing its process group.
TIMEOUT_S = 600

# A process that takes the workdir lock of argv[1], says "held" and keeps it.
LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from grain_jax.train import workdir_lock
    workdir_lock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


def until(condition, what: str, timeout_s: float = 30) -> None:
  """Returns once `condition()` holds; fails after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
    time.sleep(0.02)


def finish(process: subprocess.Popen, status: int = 0) -> str:
  """The output of `process` (a session of its own, output piped) once it has exited with `status`; on
  a timeout its whole process group is killed."""
  try:
    output, _ = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    raise
  assert process.returncode == status, output[-4000:]
  return output


def flip_bytes(step_dir):
  """Flips 64 bytes in the middle of the checkpoint's largest array data file."""
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(step_dir, "state"))
    for name in names
    if os.path.basename(root) == "d"
  ]
  path = max(files, key=os.path.getsize)
  blob = bytearray(open(path, "rb").read())
  middle = len(blob) // 2
  blob[middle : middle + 64] = bytes(b ^ 0xFF for b in blob[middle : middle + 64])
  open(path, "wb").write(bytes(blob))


def fill_the_disk_at(step: int, monkeypatch) -> None:
  """Makes writing the checksums of step `step` fail as on a full disk."""
  save_json = ocp.handlers.JsonCheckpointHandler._save_fn

  async def fail(self, x, directory):
    if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
      raise OSError(errno.ENOSPC, "No space left on device")
    return await save_json(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", fail)


def png_bytes(width: int = 40, height: int = 20, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
  """A PNG file's bytes: one `width` x `height` image of the RGB `color`."""
  out = io.BytesIO()
  Image.new("RGB", (width, height), color).save(out, format="PNG")
  return out.getvalue()


def unit_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
  """Random float32 vectors of `shape`, each normalized along the last axis (embeddings)."""
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def param_count(module: nnx.Module) -> int:
  """Number of parameter scalars in `module`."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture
def tiny_tfds(tmp_path):
  """Builds a tiny tfds dataset in array_record format under `tmp_path/tfds` (no tensorflow needed).

  `build(label_names, reds)` writes one 10x8 image per entry of `reds` (red channel = that value,
  label = index % len(label_names)) into split "test" and returns `(dataset name, tfds data_dir)`.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path / "tfds")

  def build(label_names, reds):
    class GrainJaxTinyTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.ClassLabel(names=list(label_names)),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for i, red in enumerate(reds):
          # encoded: tfds needs tensorflow to encode arrays
          yield i, {"image": io.BytesIO(png_bytes(10, 8, (red, 0, 0))), "label": i % len(label_names)}

    GrainJaxTinyTfds(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "grain_jax_tiny_tfds", data_dir

  return build


@pytest.fixture
def read_only():
  """`read_only(folder)` makes `folder` read-only for this process until the test ends: by its mode
  for a user, by a read-only bind mount for root (whom modes do not stop); skips where neither works."""
  undo = []

  def make(folder):
    folder = str(folder)
    if os.geteuid() != 0:
      mode = os.stat(folder).st_mode
      os.chmod(folder, 0o555)
      undo.append(lambda: os.chmod(folder, mode))
    else:
      try:
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], capture_output=True).returncode == 0
      except FileNotFoundError:
        mounted = False
      if not mounted:
        pytest.skip("cannot make a read-only folder here (root without a bind mount)")
      undo.append(lambda: subprocess.run(["umount", folder], check=True))
    assert not os.access(folder, os.W_OK)

  yield make
  for step in reversed(undo):
    step()
