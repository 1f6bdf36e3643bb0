"""The training input pipeline on Grain: record shards -> per-host batches of numpy arrays.

  source (ArrayRecord; a record whose bytes do not read is a bad record) -> seeded global shuffle
  -> repeat -> decode + tokenize (lazily, only the rows this host reads) -> this host's rows of each
  global batch (thread pool) -> skip / count bad records -> batch [in num_workers processes when
  > 0] -> merge the counts, stop if too many records are bad

The order and the random choices are those of the global dataset, so one process and several
processes with the same global batch see the same global batches (as long as no record is skipped
and num_workers is 0).

The iterator is a Grain DatasetIterator: `get_state()` / `set_state()` checkpoint the position (and
the bad-record counts) exactly, e.g. with Orbax's Grain checkpoint handler.
"""

import functools
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from grain_jax.data import examples, quality, records, synthetic, workers

BATCH_KEYS = ("image", "caption_ids", "boxes", "box_valid", "desc_ids", "desc_text_id")


def _with_index(index: int, data: bytes) -> tuple[int, bytes]:
  return index, data


class _Prepare(grain.transforms.RandomMap):
  """(record index, serialized record) -> (example or None, reasons, record index)."""

  def __init__(self, **kwargs: Any):
    self._kwargs = kwargs

  def random_map(self, element: tuple[int, bytes], rng: np.random.Generator):
    index, data = element
    example, reasons = examples.prepare(data, rng, **self._kwargs)
    return example, reasons, index


class _HostRows(grain.MapDataset):
  """Host `host`'s rows of every global batch: its i-th element is global element
  `(i // rows) * rows * hosts + host * rows + i % rows`."""

  def __init__(self, parent: grain.MapDataset, host: int, hosts: int, rows: int):
    super().__init__(parent)
    self._host, self._hosts, self._rows = host, hosts, rows

  def __len__(self) -> int:
    return len(self._parent) // self._hosts

  def _global_index(self, index: int) -> int:
    batch, row = divmod(index, self._rows)
    return (batch * self._hosts + self._host) * self._rows + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._global_index(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"_HostRows(host={self._host}, hosts={self._hosts}, rows={self._rows})"


def _stack(batch: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch with a leading `[b]` axis."""
  return {key: np.stack([e[key] for e in batch]) for key in batch[0]}


class _BatchIterator(grain.DatasetIterator):
  """Batches the good examples and reports the counts of what it read for this batch.

  Raises BadDataError when filling one batch takes more than twice its size in records (at least
  quality.MIN_RECORDS) and more than `max_bad_fraction` of them are bad: data that is all bad
  would otherwise never fill a batch, and the trainer's check would never run.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, locate, max_bad_fraction: float, source: str):
    super().__init__(parent)
    self._batch_size = batch_size
    self._locate = locate  # record index -> (shard file, number in it), to name them in errors
    self._max_bad_fraction = max_bad_fraction
    self._source = source

  def __next__(self) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    batch = []
    report = quality.DataStats(self._max_bad_fraction, max(quality.MIN_RECORDS, 2 * self._batch_size), self._source)
    while len(batch) < self._batch_size:
      try:
        example, reasons, index = next(self._parent)
      except StopIteration:
        if not report.seen:
          raise
        return None, report.get_state()  # the last records, too few for a batch, still count
      skipped = example is None
      if skipped:
        path, position = self._locate(index)
        report.add(reasons, skipped, path, f"{path}, record {position}")
      else:
        report.add(reasons, skipped)
      if skipped:
        report.check()
      else:
        batch.append(example)
    return _stack(batch), report.get_state()

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _BatchDataset(grain.IterDataset):
  """Runs in the worker processes, so batches cross to the trainer in one shared-memory copy."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, locate, max_bad_fraction: float, source: str):
    super().__init__(parent)
    self._batch_size = batch_size
    self._locate = locate
    self._max_bad_fraction = max_bad_fraction
    self._source = source

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self._batch_size, self._locate, self._max_bad_fraction, self._source)


class TrainIterator(grain.DatasetIterator):
  """Yields batches; `stats` (a DataStats) holds the bad-record counts the trainer logs."""

  def __init__(self, parent: grain.DatasetIterator, stats: quality.DataStats):
    super().__init__(parent)
    self.stats = stats

  def __next__(self) -> dict[str, np.ndarray]:
    batch, report = next(self._parent)
    self.stats.merge(report)
    self.stats.check()
    if batch is None:
      raise StopIteration
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"input": self._parent.get_state(), "stats": self.stats.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["input"])
    self.stats.set_state(state["stats"])


class TrainDataset(grain.IterDataset):
  """The training batches; iterating gives a fresh TrainIterator."""

  def __init__(self, parent: grain.IterDataset, data_dir: str, max_bad_fraction: float):
    super().__init__(parent)
    self._data_dir = data_dir
    self._max_bad_fraction = max_bad_fraction

  def __iter__(self) -> TrainIterator:
    stats = quality.DataStats(self._max_bad_fraction, source=self._data_dir)
    return TrainIterator(self._parent.__iter__(), stats)


def train_dataset(
  data_dir: str,
  *,
  global_batch_size: int,
  image_size: int,
  num_regions: int,
  seed: int,
  mllm_prob: float = 0.5,
  num_epochs: int | None = None,
  num_workers: int = 0,
  worker_buffer_size: int = 2,
  read_threads: int = 4,
  max_bad_fraction: float = 0.05,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainDataset:
  """This host's training batches from the record shards in `data_dir`.

  Each batch (numpy, b = global_batch_size / process_count, H = image_size, k = num_regions):
  `image [b, H, H, 3] float32`, `caption_ids [b, 77] int32`, `boxes [b, k, 4] float32` (cxcywh),
  `box_valid [b, k] bool`, `desc_ids [b, k, 77] int32`, `desc_text_id [b, k] int32`.
  Hosts read disjoint rows of each global batch; `num_epochs=None` repeats forever. Batches are a
  function of `seed`, the host and `num_workers` (each worker batches its own slice), not of
  thread timing.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"config.data.batch_size={global_batch_size} is not divisible by the {process_count} processes")
  manifest = records.read_manifest(data_dir)
  source = records.data_source(data_dir, manifest)
  if len(source) < process_count:
    raise ValueError(f"{data_dir} holds {len(source)} records: none for host {process_index} of {process_count}")
  dataset = grain.MapDataset.source(source).map_with_index(_with_index)
  # Grain derives the shuffle's and the per-example seeds from this one, by global position.
  dataset = dataset.seed(seed).shuffle().repeat(num_epochs)
  dataset = dataset.random_map(_Prepare(image_size=image_size, num_regions=num_regions, mllm_prob=mllm_prob))
  dataset = _HostRows(dataset, process_index, process_count, global_batch_size // process_count)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))
  locate = functools.partial(records.record_location, data_dir, manifest)
  dataset = _BatchDataset(dataset, global_batch_size // process_count, locate, max_bad_fraction, data_dir)
  if num_workers > 0:
    # Grain's worker processes read absl flags; programs that don't parse absl flags (pytest,
    # notebooks, a main without absl.app) take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size),
      worker_init_fn=workers.init_worker,
    )
  return TrainDataset(dataset, data_dir, max_bad_fraction)


def training_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.train_dir`, or the built-in synthetic dataset (generated if missing)."""
  return config.data.train_dir or synthetic.for_config(config, workdir)["train"]


def train_dataset_from_config(config: ml_collections.ConfigDict, data_dir: str, **overrides: Any) -> TrainDataset:
  """train_dataset() with sizes from `config.model`, seed `config.seed`, options `config.data`."""
  data = config.data
  kwargs = dict(
    global_batch_size=data.batch_size,
    image_size=config.model.image.image_size,
    num_regions=config.model.decoder.num_region_queries,
    seed=config.seed,
    mllm_prob=data.mllm_caption_prob,
    num_epochs=data.num_epochs,
    num_workers=data.num_workers,
    worker_buffer_size=data.worker_buffer_size,
    read_threads=data.read_threads,
    max_bad_fraction=data.max_bad_fraction,
  )
  kwargs.update(overrides)
  return train_dataset(data_dir, **kwargs)
