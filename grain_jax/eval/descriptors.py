"""Descriptor files (Menon & Vondrick's `{class name: [descriptor, ...]}` JSON) and how their
entries are paired with a dataset's classes.

Each class is paired on its own:
  "name"      its normalized name equals exactly one key's (case, "_", "-", "/", "?", every bracket
              and SUN397's / Places365's leading "/<initial>/" are ignored), or failing that its
              name without a trailing "(...)" equals exactly one unpaired key's without one;
  "position"  the key at its label index, for sets whose labels are ids (CUB, ImageNet: every
              class), or, in a file with one key per class, when the file looks like the label
              list with some keys renamed in place: every class paired by name sits at its key's
              index, and no key left unused names another class left unpaired (as "bumble bee"
              names "bee");
  "missing"   neither: the class is prompted by its name alone and described by its name.
Position pairing cannot tell a key renamed in place from one moved there: a file in label order
whose leftover keys were also shuffled among themselves, none naming another class, is mis-paired.
`record` lists each class's pairing, so such a file shows in results.json. For sets whose labels are
ids, `check_order` refuses a file whose keys are not in label order, where the classes' names are
known (CUB's examples name their class, ImageNet's wnids have WordNet names).
"""

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

from grain_jax.errors import BadFileError


def without_initial_folder(name: str) -> str:
  """SUN397's and Places365's labels sit in a folder named by their initial: "/a/abbey" -> "abbey"."""
  return re.sub(r"^/[a-z]/", "", name)


def normalized(name: str) -> str:
  """The form names are compared in: without an initial folder, lower case, "_-/?()" as spaces,
  single spaces, stripped: "Siamese_cat", "siamese-cat?", "(Siamese) cat" -> "siamese cat";
  "/a/apartment_building/outdoor" -> "apartment building outdoor"."""
  name = re.sub(r"[_\-/?()]", " ", without_initial_folder(name).lower())
  return re.sub(r"\s+", " ", name).strip()


def unqualified(name: str) -> str:
  """`normalized(name)` without a trailing "(...)": "crane (machine)" -> "crane"."""
  return normalized(re.sub(r"\s*\([^()]*\)\s*$", "", name))


@dataclasses.dataclass(frozen=True)
class Pair:
  """One class's descriptors: its label's name, the file's key for it (None: missing), and how
  (`how`: "name", "position" or "missing", as the module doc describes)."""

  label_name: str
  key: str | None
  how: str


def read(path: str) -> tuple[dict[str, list[str]], str]:
  """(the descriptor file at `path`, its sha256); BadFileError naming the file if it is not one."""
  with open(path, "rb") as f:
    content = f.read()
  try:
    raw = json.loads(content)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise BadFileError(f"descriptor file {path} is not JSON: {error}") from None
  if not isinstance(raw, dict) or not all(
    isinstance(v, list) and all(isinstance(d, str) for d in v) for v in raw.values()
  ):
    raise BadFileError(f"descriptor file {path} must be a JSON object {{class name: [descriptor, ...]}}")
  return raw, hashlib.sha256(content).hexdigest()


def _unique_index(names: Sequence[str], form) -> dict[str, int]:
  """{form(name): position} over the names whose form no other name shares."""
  positions: dict[str, list[int]] = {}
  for i, name in enumerate(names):
    positions.setdefault(form(name), []).append(i)
  return {k: v[0] for k, v in positions.items() if len(v) == 1}


def pair(keys: Sequence[str], label_names: Sequence[str], labels_are_ids: bool = False) -> list[Pair]:
  """Pairs the keys of a descriptor file (in file order) with the label names (in label order).

  Raises:
    BadFileError: the labels are ids and the file does not have one key per class.
  """
  if labels_are_ids:
    if len(keys) != len(label_names):
      raise BadFileError(
        f"the labels are ids, so the descriptor file must have one key per class in "
        f"label order: it has {len(keys)} keys for {len(label_names)} classes"
      )
    return [Pair(name, key, "position") for name, key in zip(label_names, keys)]
  paired: dict[int, int] = {}  # label index -> key index
  for form in (normalized, unqualified):
    free_keys = [i for i in range(len(keys)) if i not in paired.values()]
    free_labels = [i for i in range(len(label_names)) if i not in paired]
    key_index = _unique_index([keys[i] for i in free_keys], form)
    label_index = _unique_index([label_names[i] for i in free_labels], form)
    for form_name, j in label_index.items():
      if form_name in key_index:
        paired[free_labels[j]] = free_keys[key_index[form_name]]
  by_name = set(paired)
  if len(keys) == len(label_names) and _renamed_in_place(keys, label_names, paired):
    paired.update({i: i for i in range(len(label_names)) if i not in paired})
  return [
    Pair(
      name,
      keys[paired[i]] if i in paired else None,
      "name" if i in by_name else "position" if i in paired else "missing",
    )
    for i, name in enumerate(label_names)
  ]


def _renamed_in_place(keys: Sequence[str], label_names: Sequence[str], paired: Mapping[int, int]) -> bool:
  """Whether the keys left unused look renamed in place: every class paired so far (`paired`: label
  index -> key index) sits at its key's index, and no unused key holds the whole name of another
  unpaired class."""
  if any(i != j for i, j in paired.items()):
    return False
  unpaired = [i for i in range(len(label_names)) if i not in paired]
  return not any(
    f" {normalized(label_names[i])} " in f" {normalized(keys[j])} " for j in unpaired for i in unpaired if i != j
  )


def check_order(keys: Sequence[str], class_names: Sequence[Sequence[str]]) -> None:
  """For a set labelled by ids, whose classes take the file's keys in order: raises BadFileError unless
  the keys are in label order, judged by the keys that name a class (`normalized` equal to one of its
  `class_names[i]`, its known names): most of them must name the class at their own position.
  A key naming no class (written differently) counts neither way; a file where no key names its own
  class is refused, as nothing shows its order.
  """
  forms = [{normalized(name) for name in names} for names in class_names]
  at_own = sum(normalized(key) in forms[i] for i, key in enumerate(keys))
  named = {form: i for i, names in enumerate(forms) for form in names}
  elsewhere = [
    (key, i, named[normalized(key)])
    for i, key in enumerate(keys)
    if normalized(key) in named and normalized(key) not in forms[i]
  ]
  if at_own == 0 or len(elsewhere) >= at_own:
    examples = "; ".join(f"key {i} {key!r} names class {j}" for key, i, j in elsewhere[:3])
    raise BadFileError(
      f"its keys are not in label order: {at_own} of {len(keys)} keys name the class at their "
      f"position, {len(elsewhere)} name another class ({examples or 'none'})"
    )


def prompt_names(pairs: Sequence[Pair]) -> list[str]:
  """The class names to prompt with: the label's own name, or the file's key where the class was
  paired by position (the name its descriptors were written for; for id labels the only name)."""
  return [p.key if p.how == "position" else p.label_name for p in pairs]


def summary(pairs: Sequence[Pair]) -> str:
  """One word for the whole set: "name" or "position" when every class was paired so, "mixed" when
  all were paired, "partial" when some are missing."""
  hows = {p.how for p in pairs}
  if "missing" in hows:
    return "partial"
  return hows.pop() if len(hows) == 1 else "mixed"


def record(path: str, digest: str, pairs: Sequence[Pair], raw: Mapping[str, Sequence[str]]) -> dict:
  """What results.json says of a set's descriptors: the file, its sha256, each class's pairing, and
  the classes paired with an empty descriptor list (they are described by their name)."""
  return {
    "file": os.path.abspath(path),
    "sha256": digest,
    "alignment": summary(pairs),
    "pairing": [dataclasses.asdict(p) for p in pairs],
    "empty": [p.label_name for p in pairs if p.key is not None and not raw[p.key]],
  }
