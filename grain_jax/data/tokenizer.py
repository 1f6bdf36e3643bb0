"""OpenAI CLIP byte-level BPE tokenizer (reimplementation, same ids as CLIP's SimpleTokenizer).

Pipeline per string: ftfy.fix_text, HTML-unescape twice, collapse whitespace and strip,
lower-case, split with CLIP's pre-tokenization regex, then byte-level BPE over the merges in
`bpe_simple_vocab_16e6.txt.gz`. The vocabulary is the 256 byte symbols, the same with the
end-of-word marker `</w>`, one symbol per merge (48894 of them), then `<|startoftext|>` and
`<|endoftext|>`: 49408 ids in all.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps only this many merges from the file, which leaves exactly 49408 ids.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

# Special tokens and contractions come first so they win over the generic classes.
_LEADING_ALTERNATIVES = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
# IGNORECASE matters even on lower-cased text: under case folding "'s" also matches "'ſ", as in
# CLIP. The special-token alternatives let a literal "<|endoftext|>" in the text encode to
# EOT_ID, again as CLIP does.
_WORD_PATTERN = regex.compile(_LEADING_ALTERNATIVES + r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# The same split for cleaned ASCII text, whose letters are already a-z and whose only whitespace
# is ' '; the stdlib engine runs it about twice as fast as `regex` runs the Unicode pattern.
_ASCII_WORD_PATTERN = re.compile(_LEADING_ALTERNATIVES + r"[a-z]+|[0-9]|[^ a-z0-9]+")


def _byte_symbols() -> tuple[list[str], list[str]]:
  """Returns the stand-in character of each byte: indexed by byte, and in vocabulary order.

  BPE runs on strings, so every byte needs a visible, non-whitespace character: printable
  Latin-1 bytes stand for themselves and the remaining 68 are moved to code points 256 and up.
  The vocabulary lists the kept bytes first, then the moved ones.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  kept = set(keep)
  symbols = {b: chr(b) for b in keep}
  shifted = 256
  for b in range(256):
    if b not in kept:
      symbols[b] = chr(shifted)
      shifted += 1
  by_byte = [symbols[b] for b in range(256)]
  return by_byte, [symbols[b] for b in keep] + [s for b, s in enumerate(by_byte) if b not in kept]


def _clean(text: str) -> str:
  """Normalizes text the way CLIP does before splitting it into words."""
  # ftfy and unescape cannot change printable ASCII without '&' (see test_fast_path_is_exact),
  # and ftfy is most of the per-caption cost, so common captions skip it.
  if not (text.isascii() and text.isprintable() and "&" not in text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  # str.split and CLIP's regex \s agree on every character that can survive ftfy + unescape.
  return " ".join(text.split()).lower()


class Tokenizer:
  """CLIP BPE tokenizer; `__call__` gives the `[N, context_length]` int32 batch CLIP expects.

  Args:
    vocab_path: gzipped merges file; defaults to the copy shipped in this package.
    cache_size: how many distinct words to keep BPE results for before the cache is reset.
  """

  def __init__(self, vocab_path: str | None = None, cache_size: int = 200_000):
    if vocab_path is None:
      raw = importlib.resources.files(__package__).joinpath(VOCAB_FILE).read_bytes()
    else:
      with open(vocab_path, "rb") as f:
        raw = f.read()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{vocab_path or VOCAB_FILE}: expected {NUM_MERGES} merge lines of two symbols")

    self._byte_symbol, base = _byte_symbols()
    vocab = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
    self.vocab: list[str] = vocab
    self._ids = {symbol: i for i, symbol in enumerate(vocab)}
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    byte_of_symbol = {s: b for b, s in enumerate(self._byte_symbol)}
    # `</w>` is made of symbols that stand for themselves, so it survives as bytes and is turned
    # into a space only after the whole sequence is decoded, exactly as CLIP does.
    self._id_bytes = [bytes(byte_of_symbol[c] for c in symbol) for symbol in vocab[:SOT_ID]]
    self._id_bytes += [SOT_TEXT.encode(), EOT_TEXT.encode()]
    self._specials = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}
    self._cache: dict[str, tuple[int, ...]] = {}
    self._cache_size = cache_size

  @property
  def vocab_size(self) -> int:
    """Number of ids, 49408 for the CLIP vocabulary; the largest id is EOT_ID."""
    return len(self.vocab)

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Returns the ids of one pre-tokenized word, merging pairs in rank order like CLIP."""
    special = self._specials.get(word)
    if special is not None:
      return special
    symbols = [self._byte_symbol[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    ranks = self._ranks
    while len(symbols) > 1:
      best_rank, best = None, None
      for pair in zip(symbols, symbols[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best = rank, pair
      if best is None:
        break
      first, second = best
      merged = first + second
      # Every non-overlapping occurrence of the best pair merges in one left-to-right pass.
      out = []
      i, n = 0, len(symbols)
      while i < n:
        if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
          out.append(merged)
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      symbols = out
    ids = self._ids
    return tuple(ids[s] for s in symbols)

  def encode(self, text: str) -> list[int]:
    """Returns the BPE ids of `text` (variable length `[L]`, without SOT/EOT)."""
    cache = self._cache
    out: list[int] = []
    text = _clean(text)
    pattern = _ASCII_WORD_PATTERN if text.isascii() else _WORD_PATTERN
    for word in pattern.findall(text):
      ids = cache.get(word)
      if ids is None:
        ids = self._bpe(word)
        # A plain reset keeps memory bounded; frequent words come back on their next use.
        if len(cache) >= self._cache_size:
          cache.clear()
        cache[word] = ids
      out.extend(ids)
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids` with word ends as spaces (so it usually ends with one)."""
    data = b"".join(self._id_bytes[int(i)] for i in ids)
    return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

  def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Tokenizes a string or a batch of N strings.

    Args:
      texts: one string (treated as a batch of one) or a sequence of N strings.
      context_length: tokens per row, SOT and EOT included.

    Returns:
      int32 array `[N, context_length]`: SOT, the BPE ids, EOT, then zeros. Rows that do not fit
      are cut and their last slot set to EOT, so every row still ends its text with EOT.
    """
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
      tokens = [SOT_ID, *self.encode(text), EOT_ID]
      if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = EOT_ID
      result[row, : len(tokens)] = tokens
    return result


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
  """Returns the process-wide tokenizer built from the packaged vocabulary (loaded once)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Tokenizes with the shared default tokenizer; returns int32 `[N, context_length]`."""
  return default_tokenizer()(texts, context_length)
