"""CompiledStep: one program per batch shape, and a barrier after each new program in a
multi-process run (so no process enters the step's collectives while another still compiles)."""

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.train import compiled_step


def toy_step(state, batch):
  """Stands in for the train step: same calling convention, donated state."""
  return state + batch["x"].sum(), {"loss": jnp.mean(batch["x"] ** 2)}


def test_programs_are_compiled_once_per_batch_shape_and_compute_the_step(monkeypatch):
  barriers = []
  monkeypatch.setattr(compiled_step.jax, "process_count", lambda: 2)
  monkeypatch.setattr(
    compiled_step.ocp.multihost,
    "sync_global_processes",
    lambda name, timeout, processes: barriers.append((name, timeout, processes)),
  )
  step = compiled_step.CompiledStep(jax.jit(toy_step, donate_argnums=0))
  state = jnp.float32(0)
  shapes = [(2,), (2,), (3,), (2,), (3, 1)]
  for index, shape in enumerate(shapes):
    batch = {"x": jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) + index}
    expected_state, expected_metrics = toy_step(state, batch)
    state, metrics = step(state, batch)
    assert float(state) == float(expected_state)
    assert float(metrics["loss"]) == float(expected_metrics["loss"])
  assert [name for name, _, _ in barriers] == [f"grain_jax_compiled_train_step_{n}" for n in (1, 2, 3)]
  assert all(
    processes == {0, 1} and timeout == compiled_step.COMPILE_BARRIER_TIMEOUT_S for _, timeout, processes in barriers
  )


def test_a_single_process_run_never_waits(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("a single process must not wait at a barrier")

  monkeypatch.setattr(compiled_step.ocp.multihost, "sync_global_processes", fail)
  step = compiled_step.CompiledStep(jax.jit(toy_step))
  state, _ = step(jnp.float32(1), {"x": jnp.ones((4,))})
  assert float(state) == 5.0


def test_the_signature_tells_shapes_and_dtypes_apart():
  signature = compiled_step.batch_signature
  assert signature({"a": np.zeros((2, 3)), "b": np.zeros(4)}) == signature({"b": np.ones(4), "a": np.ones((2, 3))})
  assert signature({"a": np.zeros((2, 3))}) != signature({"a": np.zeros((3, 2))})
  assert signature({"a": np.zeros(2, np.float32)}) != signature({"a": np.zeros(2, np.int32)})
