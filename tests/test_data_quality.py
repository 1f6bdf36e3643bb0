"""Bad-input repairs, skips and their counts."""

import math

import pytest

from grain_jax.data import quality, records


@pytest.mark.parametrize(
  "box, expected, reasons",
  [
    ((0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4), []),
    ((0.3, 0.4, 0.1, 0.2), (0.1, 0.2, 0.3, 0.4), [quality.BOX_REORDERED]),
    ((-0.5, 0.2, 1.5, 0.4), (0.0, 0.2, 1.0, 0.4), [quality.BOX_CLIPPED]),
    ((1.2, 0.2, 1.5, 0.4), None, [quality.BOX_CLIPPED, quality.BAD_BOX]),
    ((0.1, 0.2, 0.1, 0.4), None, [quality.BAD_BOX]),
    ((0.1, math.nan, 0.3, 0.4), None, [quality.BAD_BOX]),
    ((0.1, 0.2, 0.3), None, [quality.BAD_BOX]),
  ],
)
def test_clean_box(box, expected, reasons):
  cleaned, got = quality.clean_box(box)
  assert got == reasons
  assert cleaned == (pytest.approx(expected) if expected else None)


def test_clean_regions_drops_and_counts():
  regions = [
    records.Region("  a red   square ", (0.1, 0.1, 0.5, 0.5), 0.9),
    records.Region("", (0.1, 0.1, 0.5, 0.5), 0.9),
    records.Region("bad text \udcff", (0.1, 0.1, 0.5, 0.5), 0.9),
    records.Region("a blue star", (0.5, 0.5, 0.5, 0.9), 0.9),
  ]
  kept, reasons = quality.clean_regions(regions)
  assert kept == [records.Region("a red square", (0.1, 0.1, 0.5, 0.5), 0.9)]
  assert sorted(reasons) == sorted([quality.EMPTY_DESCRIPTION, quality.NON_UTF8_TEXT, quality.BAD_BOX])
  assert quality.clean_regions([]) == ([], [quality.NO_REGIONS])


def test_clean_text():
  assert quality.clean_text(b"caf\xc3\xa9  au lait\n") == "café au lait"
  with pytest.raises(quality.BadRecordError, match=quality.NON_UTF8_TEXT):
    quality.clean_text(b"\xff\xfe")


def test_stats_threshold_names_worst_file():
  stats = quality.DataStats(max_bad_fraction=0.1, min_records=10, source="data/")
  for _ in range(8):
    stats.add([quality.BOX_CLIPPED], skipped=False)
  stats.add([quality.CORRUPT_IMAGE], skipped=True, file="shard-00003")
  stats.check()  # 1 of 9: too few records for a verdict
  stats.add([quality.UNREADABLE_RECORD], skipped=True, file="shard-00003")
  with pytest.raises(quality.BadDataError, match="2 of 10 .*2 of them in shard-00003"):
    stats.check()
  assert stats.summary() == {
    "seen": 10,
    "skipped": 2,
    "skipped/corrupt_image": 1,
    "skipped/unreadable_record": 1,
    "fixed/box_clipped": 8,
  }


def test_stats_state_round_trip_and_merge():
  stats = quality.DataStats()
  stats.add([quality.CORRUPT_IMAGE], skipped=True, file="a")
  stats.add([quality.BOX_REORDERED, quality.NO_REGIONS], skipped=False)
  restored = quality.DataStats()
  restored.set_state(stats.get_state())
  assert restored.summary() == stats.summary()
  restored.merge(stats.get_state())
  assert restored.summary()["seen"] == 4 and restored.summary()["skipped/corrupt_image"] == 2


def test_the_first_skipped_record_of_each_reason_is_kept_and_named():
  stats = quality.DataStats(max_bad_fraction=0.1, min_records=2)
  stats.add([quality.DAMAGED_RECORD], skipped=True, file="s0", record="s0, record 7")
  stats.add([quality.DAMAGED_RECORD], skipped=True, file="s1", record="s1, record 2")
  merged = quality.DataStats()
  merged.merge(stats.get_state())
  assert merged.first_skipped == {quality.DAMAGED_RECORD: "s0, record 7"}
  with pytest.raises(quality.BadDataError, match=r"the first of each reason: damaged_record at s0, record 7\)"):
    stats.check()
  older = {key: value for key, value in stats.get_state().items() if key != "first_skipped"}
  restored = quality.DataStats()
  restored.set_state(older)  # an iterator state saved before the locations were kept
  assert restored.summary() == stats.summary() and restored.first_skipped == {}
