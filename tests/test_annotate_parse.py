"""The MLLM answer parser on fixed answers."""

import pytest

from grain_jax.annotate import parse


def test_labeled_caption_and_bullets_of_every_kind():
  answer = """Caption: A red **square** on green grass.

Features:
- a red square
* 1. Blue sky.
2) "a wooden fence"
(3) green grass;
•a small white cloud
+ 4. a red square
"""
  caption, descriptions = parse.parse_response(answer)
  assert caption == "A red square on green grass"
  assert descriptions == ["a red square", "Blue sky", "a wooden fence", "green grass", "a small white cloud"]


def test_unlabeled_caption_is_the_first_plain_line():
  caption, descriptions = parse.parse_response(
    "A dog running on a beach.\n- black ears\nThe dog looks happy.\n- wet sand"
  )
  assert caption == "A dog running on a beach"
  assert descriptions == ["black ears", "wet sand"]  # plain lines outside a list are not features


def test_plain_lines_after_a_features_header_are_descriptions():
  answer = (
    "Here is the description.\nCaption: a bird on a branch\n"
    "Distinctive visual features: a yellow throat\nblack wings\n\nBlack wings\n"
  )
  caption, descriptions = parse.parse_response(answer)
  assert caption == "a bird on a branch"
  assert descriptions == ["a yellow throat", "black wings"]  # repeats differ only in case


def test_numbers_inside_text_and_lone_markers():
  caption, descriptions = parse.parse_response("Caption: 3 cats\n-\n1.\n- 2.5 inch screws\n10) ten")
  assert caption == "3 cats"
  assert descriptions == ["2.5 inch screws", "ten"]


@pytest.mark.parametrize("answer", ["", "\n\n", "- \n* \n"])
def test_empty_answers(answer):
  assert parse.parse_response(answer) == ("", [])


def test_at_most_max_descriptions_first_ones_kept():
  answer = "\n".join(f"- feature {i}" for i in range(15))
  assert parse.parse_response(answer, max_descriptions=3) == ("", ["feature 0", "feature 1", "feature 2"])
