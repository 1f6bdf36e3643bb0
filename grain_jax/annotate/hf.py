"""Hugging Face models for annotation: the optional dependencies, the device and the dtype.

torch and transformers are an extra (requirements-annotate.txt): they are imported here, on use,
so that the core package and its tests run without them.
"""

from typing import Any

from grain_jax.errors import ArgumentError

INSTALL_HINT = "pip install -r requirements-annotate.txt"
# Weights stay in the checkpoint's float32 on CPUs; GPUs run the half-precision LLaVA / OWLv2 weights.
_DTYPES = ("auto", "float32", "float16", "bfloat16")


def import_torch_and_transformers() -> tuple[Any, Any]:
  """(torch, transformers), or an ImportError that says how to install them."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"annotation needs torch and transformers ({e}); {INSTALL_HINT}") from e
  return torch, transformers


def device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
  """("auto" | "cpu" | "cuda[:i]", "auto" | dtype name) -> (torch.device, torch.dtype).

  "auto" picks the GPU when torch sees one, and float16 there, float32 on the CPU.
  """
  torch, _ = import_torch_and_transformers()
  if dtype not in _DTYPES:
    raise ArgumentError(f"--dtype={dtype!r} is not one of {_DTYPES}")
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  device = torch.device(device)
  if device.type == "cuda" and not torch.cuda.is_available():
    raise ArgumentError(f"--device={device} but torch sees no GPU")
  if dtype == "auto":
    dtype = "float16" if device.type == "cuda" else "float32"
  return device, getattr(torch, dtype)


def load(auto_class: str, model_id: str, device: Any, dtype: Any) -> tuple[Any, Any]:
  """(processor, model in eval mode on `device`) for a hub id or a local directory.

  `auto_class` names the transformers Auto class of the task, e.g. "AutoModelForImageTextToText".
  """
  _, transformers = import_torch_and_transformers()
  try:
    processor = transformers.AutoProcessor.from_pretrained(model_id)
    model = getattr(transformers, auto_class).from_pretrained(model_id, dtype=dtype)
  except (OSError, ValueError) as e:
    raise ArgumentError(f"cannot load {model_id!r} as {auto_class} with its processor: {e}") from e
  return processor, model.to(device).eval()
