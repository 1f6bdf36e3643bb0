"""Test session setup: 8 simulated CPU devices so sharded runs can be compared with one device, one
compilation cache for the session, and XLA's backend optimizations off.

Many tests build the same tiny step anew (a resumed run, the processes of a multi-process launch):
the persistent cache, inherited by subprocesses through the environment, compiles each program once.
The tests' models are tiny, so compiling is most of their time: without LLVM's optimizations the
train step compiles in half the time and runs about as fast.
"""

import atexit
import io
import os
import shutil
import subprocess
import tempfile

import pytest
from PIL import Image

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="grain_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(label_names))}))

      def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for i, red in enumerate(reds):
          png = io.BytesIO()  # encoded: tfds needs tensorflow to encode arrays
          Image.new("RGB", (10, 8), (red, 0, 0)).save(png, format="PNG")
          png.seek(0)
          yield i, {"image": png, "label": i % len(label_names)}

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
