"""A batch's captions and descriptions packed end to end into rows, for one pass of the text tower.

Each example brings a caption and up to k descriptions, each a token row of the full context that
ends at its EOT token (the highest id) and is zero after it. Run as they come, most of the tower's
tokens would be padding, and an empty description slot would still run whole. Packed, the texts of
a group of examples share rows of `row_length` tokens: every text is a segment of a row (segment
numbers 1, 2, ... within the row, 0 on the row's unused tail), its positions restart at 0, and the
text tower attends causally within a segment only (`TextTransformer.packed`), so each text's
embedding is the one it gets alone.

Groups: the examples of one device's micro-batch are packed together (the host batch is `groups`
consecutive groups, in the order the mesh and gradient accumulation split it), so each text lands on
the device of its example and reading the embeddings back takes no collective. Every group gets the
same number of rows, rounded up (`padded_rows`) so that few batch shapes need compiling.

The packed batch replaces `caption_ids` and `desc_ids` with (G groups, R rows each, P = row_length,
M = TEXTS_PER_ROW):
  text_tokens    [G * R, P] int32   token ids
  text_segments  [G * R, P] int32   the segment of each token (0: unused)
  text_positions [G * R, P] int32   each token's position in its text
  text_eot       [G * R, M] int32   the column of each segment's EOT token (0 for unused segments)
  caption_slot   [b] int32          where each caption's embedding is: `row * M + m` for the m-th text
                                    (from 0) of a row, rows counted within their group
  desc_slot      [b, k] int32       the same for each description (0 for an empty slot)
"""

from collections.abc import Callable

import numpy as np

# The most texts one row holds; the last text block reads M positions in every row.
TEXTS_PER_ROW = 16
PACKED_KEYS = ("text_tokens", "text_segments", "text_positions", "text_eot", "caption_slot", "desc_slot")


def text_lengths(ids: np.ndarray) -> np.ndarray:
  """Tokens through EOT of each row of `ids [..., L]` -> `[...]` (0 for an all-zero row)."""
  return np.where(ids.any(axis=-1), np.argmax(ids, axis=-1) + 1, 0)


def padded_rows(rows: int) -> int:
  """`rows` rounded up to one of four steps per power of two (16, 20, 24, 28, 32, 40, 48, ...):
  at most a quarter more rows, and few distinct shapes as the texts' lengths vary."""
  step = max(1, 2 ** (rows.bit_length() - 3))
  return max(1, -(-rows // step) * step)


class _Rows:
  """The packing of one group: best fit, longest texts first."""

  def __init__(self, row_length: int):
    self.row_length = row_length
    self.used: list[int] = []  # tokens taken in each row
    self.count: list[int] = []  # texts in each row
    self._by_room: list[list[int]] = [[] for _ in range(row_length + 1)]  # open rows by free tokens

  def place(self, length: int) -> tuple[int, int, int]:
    """Puts a text of `length` tokens in the open row with the least room that fits it (a new row
    when none does); returns (row, segment index, start column)."""
    for room in range(length, self.row_length + 1):
      if self._by_room[room]:
        row = self._by_room[room].pop()
        break
    else:
      row = len(self.used)
      self.used.append(0)
      self.count.append(0)
    start, segment = self.used[row], self.count[row]
    self.used[row] += length
    self.count[row] += 1
    room = self.row_length - self.used[row]
    if self.count[row] < TEXTS_PER_ROW and room > 0:
      self._by_room[room].append(row)
    return row, segment, start


def _pack_group(lengths: np.ndarray, row_length: int):
  """Places texts of `lengths [n]` (0: leave out) in rows; returns the rows, and each text's
  (row, segment index, start column) `[n, 3]` (row -1 for a text left out)."""
  rows = _Rows(row_length)
  placed = np.full((len(lengths), 3), -1, np.int64)
  for index in np.argsort(-lengths, kind="stable"):
    if lengths[index] > 0:
      placed[index] = rows.place(int(lengths[index]))
  return rows, placed


def pack_batch(
  batch: dict[str, np.ndarray],
  groups: int,
  row_length: int,
  with_descriptions: bool = True,
  agree_rows: Callable[[int], int] | None = None,
) -> dict[str, np.ndarray]:
  """Replaces `caption_ids [b, L]` and `desc_ids [b, k, L]` of a host batch by the packed texts of
  its `groups` groups of `b / groups` examples (see the module docstring).

  Descriptions are packed where `box_valid`, and not at all without `with_descriptions` (the plain
  CLIP baseline reads none). `agree_rows(rows)` returns the row count every process uses (the
  maximum over them), so all processes run one program.
  """
  captions, descriptions, valid = batch["caption_ids"], batch["desc_ids"], batch["box_valid"]
  size, slots, _ = descriptions.shape
  if size % groups:
    raise ValueError(f"a batch of {size} examples does not split into {groups} groups of equal size")
  per_group = size // groups
  # Captions at least one token: an all-zero row reads its embedding at position 0, as unpacked.
  lengths = np.concatenate(
    [
      np.maximum(text_lengths(captions), 1).reshape(groups, per_group),
      np.where(valid & with_descriptions, np.maximum(text_lengths(descriptions), 1), 0).reshape(
        groups, per_group * slots
      ),
    ],
    axis=1,
  )
  if lengths.max() > row_length:
    raise ValueError(f"a text of {lengths.max()} tokens does not fit rows of {row_length}")
  fit = lambda x: np.pad(x[..., :row_length], [(0, 0)] * (x.ndim - 1) + [(0, max(0, row_length - x.shape[-1]))])
  # [G, n, P]: each group's captions, then its descriptions, n = per_group * (1 + k).
  ids = np.concatenate(
    [
      fit(captions).reshape(groups, per_group, row_length),
      fit(descriptions).reshape(groups, per_group * slots, row_length),
    ],
    axis=1,
  )
  packs = [_pack_group(group_lengths, row_length) for group_lengths in lengths]
  num_rows = padded_rows(max(len(rows.used) for rows, _ in packs))
  if agree_rows is not None:
    num_rows = agree_rows(num_rows)

  # Every packed token at once: its text (group, index), its offset in the text, and where it goes.
  placed = np.stack([placed for _, placed in packs])  # [G, n, 3]
  group, index = np.nonzero(lengths)
  row, segment, start = placed[group, index].T
  count = lengths[group, index]
  text = np.repeat(np.arange(len(count)), count)
  offset = np.arange(text.size) - np.repeat(np.cumsum(count) - count, count)
  target = (group[text], row[text], start[text] + offset)
  tokens = np.zeros((groups, num_rows, row_length), np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  tokens[target] = ids[group[text], index[text], offset]
  segments[target] = segment[text] + 1
  positions[target] = offset
  eot = np.zeros((groups, num_rows, TEXTS_PER_ROW), np.int32)
  eot[group, row, segment] = start + count - 1
  slot = np.zeros((groups, per_group * (1 + slots)), np.int32)
  slot[group, index] = row * TEXTS_PER_ROW + segment
  packed = {key: value for key, value in batch.items() if key not in ("caption_ids", "desc_ids")}
  packed.update(
    zip(
      PACKED_KEYS,
      (
        tokens.reshape(-1, row_length),
        segments.reshape(-1, row_length),
        positions.reshape(-1, row_length),
        eot.reshape(-1, TEXTS_PER_ROW),
        slot[:, :per_group].reshape(size),
        slot[:, per_group:].reshape(size, slots),
      ),
    )
  )
  return packed
