"""Bad input: what counts as bad, how it is fixed or skipped, and the counts per reason.

A record is *fixed* when the repair is unambiguous (a box outside [0, 1] is clipped, a box with
x2 < x1 has its corners swapped, an empty alt-text falls back to the MLLM caption) and *skipped*
otherwise (unreadable bytes, an image that does not decode, no caption at all). Regions that can
not be repaired (empty description, zero area) are dropped and counted; the image is kept.
"""

import collections
import math
from collections.abc import Iterable, Sequence
from typing import Any

from grain_jax.errors import UserError

# Reasons a record is skipped.
UNREADABLE_RECORD = "unreadable_record"
DAMAGED_RECORD = "damaged_record"  # the shard's bytes do not read (a corrupt block, a truncated chunk)
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
NON_UTF8_TEXT = "non_utf8_text"
EMPTY_CAPTION = "empty_caption"
# Repairs and dropped regions (the record is kept).
BOX_CLIPPED = "box_clipped"
BOX_REORDERED = "box_reordered"
BAD_BOX = "bad_box"  # not 4 finite numbers, or zero area after clipping
EMPTY_DESCRIPTION = "empty_description"
CAPTION_FROM_MLLM = "caption_from_mllm"  # empty alt-text replaced by the MLLM caption
NO_REGIONS = "no_regions"  # kept: the image still trains the caption loss
# Records read before the bad fraction is judged: fewer say too little.
MIN_RECORDS = 200
# Box coordinates at most this far outside [0, 1] are rounding, not errors worth counting.
_BOX_TOLERANCE = 1e-6


class BadRecordError(ValueError):
  """A record that must be skipped; `reason` is one of the skip reasons above."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class BadDataError(UserError, RuntimeError):
  """Too large a fraction of a dataset is bad to train on it."""


def clean_text(text: Any) -> str:
  """`text` as a stripped str; raises BadRecordError(NON_UTF8_TEXT) for undecodable text."""
  if isinstance(text, bytes):
    try:
      text = text.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecordError(NON_UTF8_TEXT) from e
  text = str(text)
  try:
    text.encode("utf-8")  # lone surrogates, e.g. from "\udcff" escapes in JSON
  except UnicodeEncodeError as e:
    raise BadRecordError(NON_UTF8_TEXT) from e
  return " ".join(text.split())


def clean_box(box: Sequence[float]) -> tuple[tuple[float, float, float, float] | None, list[str]]:
  """Repairs a normalized (x1, y1, x2, y2) box: returns (box or None if unusable, reasons)."""
  try:
    x1, y1, x2, y2 = (float(v) for v in box)
  except (TypeError, ValueError):
    return None, [BAD_BOX]
  if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
    return None, [BAD_BOX]
  reasons = []
  if x2 < x1 or y2 < y1:
    x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
    reasons.append(BOX_REORDERED)
  if min(x1, y1) < -_BOX_TOLERANCE or max(x2, y2) > 1 + _BOX_TOLERANCE:
    reasons.append(BOX_CLIPPED)
  x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
  if x2 <= x1 or y2 <= y1:
    return None, reasons + [BAD_BOX]
  return (x1, y1, x2, y2), reasons


def clean_regions(regions: Iterable[Any]) -> tuple[list[Any], list[str]]:
  """Repairs or drops regions (objects with description / box / score); returns (kept, reasons)."""
  kept, reasons = [], []
  for region in regions:
    try:
      description = clean_text(region.description)
    except BadRecordError as e:
      reasons.append(e.reason)
      continue
    if not description:
      reasons.append(EMPTY_DESCRIPTION)
      continue
    box, box_reasons = clean_box(region.box)
    reasons += box_reasons
    score = float(region.score)
    if box is None or not math.isfinite(score):
      if box is not None:
        reasons.append(BAD_BOX)
      continue
    kept.append(type(region)(description, box, score))
  if not kept:
    reasons.append(NO_REGIONS)
  return kept, reasons


class DataStats:
  """Counts of records seen, skipped and fixed per reason; checks the bad fraction.

  The trainer logs `summary()`; `get_state()` / `set_state()` travel with the iterator state so
  that counts survive a restart; `merge()` adds the counts gathered elsewhere (a worker, a shard).
  The first skipped record of each reason is kept by where it is (`first_skipped`), for the error.
  """

  def __init__(self, max_bad_fraction: float = 0.05, min_records: int = MIN_RECORDS, source: str = ""):
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records  # no verdict on the fraction before this many records
    self.source = source
    self.seen = 0
    self.skipped = collections.Counter()
    self.fixed = collections.Counter()
    self.bad_by_file = collections.Counter()
    self.first_skipped: dict[str, str] = {}

  def add(self, reasons: Iterable[str], skipped: bool, file: str = "", record: str = "") -> None:
    """Accounts one record: `reasons` are its skip reason or repairs; `file` where it lives and
    `record` where in it (`"<file>, record 12"`)."""
    self.seen += 1
    if skipped:
      self.skipped.update(reasons)
      self.bad_by_file[file] += 1
      for reason in reasons:
        self.first_skipped.setdefault(reason, record or file)
    else:
      self.fixed.update(reasons)

  @property
  def num_skipped(self) -> int:
    return sum(self.bad_by_file.values())

  def check(self) -> None:
    """Raises BadDataError naming the worst file when too many records are bad."""
    if self.seen < self.min_records or self.num_skipped <= self.max_bad_fraction * self.seen:
      return
    worst, count = self.bad_by_file.most_common(1)[0]
    first = "; ".join(f"{reason} at {where}" for reason, where in sorted(self.first_skipped.items()) if where)
    raise BadDataError(
      f"{self.num_skipped} of {self.seen} records read from {self.source or 'the dataset'} "
      f"were skipped as bad (more than max_bad_fraction={self.max_bad_fraction}); "
      f"reasons {dict(self.skipped)}; {count} of them in {worst or 'the input'}"
      f"{f' (the first of each reason: {first})' if first else ''}. "
      "Fix or re-convert the data, or raise config.data.max_bad_fraction."
    )

  def summary(self) -> dict[str, int]:
    """Flat counts for the logs: `seen`, `skipped`, `skipped/<reason>`, `fixed/<reason>`."""
    out = {"seen": self.seen, "skipped": self.num_skipped}
    out.update({f"skipped/{k}": v for k, v in sorted(self.skipped.items())})
    out.update({f"fixed/{k}": v for k, v in sorted(self.fixed.items())})
    return out

  def merge(self, state: dict[str, Any]) -> None:
    """Adds the counts of another DataStats' `get_state()`."""
    self.seen += int(state["seen"])
    self.skipped.update(state["skipped"])
    self.fixed.update(state["fixed"])
    self.bad_by_file.update(state["bad_by_file"])
    for reason, where in state.get("first_skipped", {}).items():
      self.first_skipped.setdefault(reason, where)

  def get_state(self) -> dict[str, Any]:
    return {
      "seen": self.seen,
      "skipped": dict(self.skipped),
      "fixed": dict(self.fixed),
      "bad_by_file": dict(self.bad_by_file),
      "first_skipped": dict(self.first_skipped),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self.seen = int(state["seen"])
    self.skipped = collections.Counter(state["skipped"])
    self.fixed = collections.Counter(state["fixed"])
    self.bad_by_file = collections.Counter(state["bad_by_file"])
    self.first_skipped = dict(state.get("first_skipped", {}))  # absent in states saved before it was kept
