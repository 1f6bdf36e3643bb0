"""From the MLLM's free text to a caption and clean region descriptions.

The prompt (mllm.PROMPT) asks for a "Caption:" line and a bulleted "Features:" list, but models
answer loosely: numbered lists, "*" bullets, markdown bold, headers, blank lines, repeats, a
caption without its label. The rules:

- caption: the text of the first "Caption:" line; without one, the first line that is neither a
  bullet nor a header.
- descriptions: every bulleted or numbered line, and every plain line after a "Features:"-style
  header; bullets and numbering are stripped (also stacked ones, "- 1. ..."), as are wrapping
  quotes and trailing punctuation. Empty ones are dropped, repeats (ignoring case) kept once, in
  order, at most `max_descriptions`.
"""

import re

from grain_jax.data import quality

# "- x", "* x", "• x", "+ x", "1. x", "2) x", "(3) x"; stacked markers are removed one by one.
_BULLET = re.compile(r"^(?:[-*•+]\s*|(?:\d{1,2}[.)]|\(\d{1,2}\))\s+)")
_HEADER = re.compile(
  r"^(caption|(?:distinctive\s+)?(?:visual\s+)?(?:features|descriptions))\s*:\s*(.*)$", re.IGNORECASE
)
_MARKDOWN = re.compile(r"\*\*|__|`")
_EDGE_PUNCTUATION = " \t.,;:!?\"'"


def _strip_bullets(line: str) -> tuple[str, bool]:
  """(line without its leading list markers, whether it had any)."""
  had_bullet = False
  while match := _BULLET.match(line):
    line, had_bullet = line[match.end() :], True
  return line, had_bullet


def _clean(text: str) -> str:
  return quality.clean_text(text).strip(_EDGE_PUNCTUATION)


def parse_response(text: str, max_descriptions: int = 10) -> tuple[str, list[str]]:
  """The MLLM's answer -> (caption or "", up to `max_descriptions` unique descriptions)."""
  caption, fallback_caption, in_features = "", "", False
  descriptions, seen = [], set()

  def add(description: str):
    description = _clean(description)
    if description and description.lower() not in seen:
      seen.add(description.lower())
      descriptions.append(description)

  for raw_line in text.splitlines():
    line = _MARKDOWN.sub("", raw_line).strip()
    line, is_bullet = _strip_bullets(line)
    if not line:
      continue
    header = _HEADER.match(line)
    if header:
      is_caption = header.group(1).lower() == "caption"
      if is_caption and not caption:
        caption = _clean(header.group(2))
      elif not is_caption:
        in_features = True
        add(header.group(2))
    elif is_bullet or in_features:
      add(line)
    elif not fallback_caption:
      fallback_caption = _clean(line)
  return caption or fallback_caption, descriptions[:max_descriptions]
