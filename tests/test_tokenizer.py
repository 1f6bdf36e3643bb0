"""Tests for the CLIP BPE tokenizer, pinned against the reference implementation's ids."""

import html
import random

import ftfy
import numpy as np
import pytest

from grain_jax.data import tokenizer as tok

# (text, BPE ids without SOT/EOT). The ids were produced once by open_clip 3.3.0's `tokenize`
# (OpenAI CLIP vocabulary, ftfy 6.3.1, regex 2026.11.15) and pasted here; they are not derived
# from this package.
REFERENCE = [
  ("a photo of a cat.", [320, 1125, 539, 320, 2368, 269]),
  ("A Photo Of A CAT", [320, 1125, 539, 320, 2368]),
  ("Café crème brûlée à la française", [15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 38381, 30505]),
  ("naïve résumé, coöperate", [1097, 35689, 563, 29106, 7054, 4166, 267, 622, 7255, 703, 671]),
  ("🐶🐱 dog and cat emoji 🎉👍🏽", [14466, 22979, 1929, 537, 2368, 16327, 4310, 43722]),
  (
    "一只猫坐在桌子上",
    [19759, 222, 34517, 103, 163, 234, 104, 161, 251, 238, 37746, 101, 162, 94, 234, 35751, 238, 19759, 488],
  ),
  (
    "日本語のテキスト、カタカナ",
    [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 45262, 37367, 34941, 37367, 2429, 488],
  ),
  ("한국어 문장", [15197, 250, 31871, 255, 31625, 368, 167, 105, 116, 20849, 354]),
  ("Tom &amp;amp; Jerry", [2435, 261, 9164]),
  (
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39;",
    [283, 321, 285, 8911, 34308, 321, 285, 257, 27706, 257, 568, 17005, 262],
  ),
  (
    "Hello, world!!! ... ?!?! (parens) [brackets] {braces}",
    [3306, 267, 1002, 995, 678, 16349, 263, 3106, 338, 264, 314, 36183, 316, 346, 19249, 348],
  ),
  (
    "In 1999 there were 12,345 people and 3.14 pies",
    [530, 272, 280, 280, 280, 997, 1365, 272, 273, 267, 274, 275, 276, 1047, 537, 274, 269, 272, 275, 6898],
  ),
  (
    "I'm sure it's what we'd've done, they'll say you're right, we've TOLD'EM",
    [
      328,
      880,
      1650,
      585,
      568,
      768,
      649,
      1896,
      1200,
      1700,
      267,
      889,
      1342,
      1451,
      592,
      982,
      1155,
      267,
      649,
      1200,
      3527,
      262,
      2270,
    ],
  ),
  ("   lots   of\t\twhitespace\n\nand newlines   ", [2958, 539, 4699, 2138, 537, 1218, 3418]),
  ("", []),
  (
    "“Curly quotes” and ‘apostrophes’ — em dash – en dash…",
    [257, 20795, 5808, 257, 537, 262, 4089, 3121, 745, 542, 262, 2005, 2270, 10206, 1224, 576, 10206, 959],
  ),
  ("The Mona Lisa doesnâ€™t have eyebrows.", [518, 19143, 7424, 2503, 713, 720, 19923, 269]),
  ("ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", [9407, 23571, 4160]),
  ("ﬁne ﬂower", [3797, 4055]),
  (
    "Stra\xdfe \xc6\xd8\xc5 \u0130stanbul it'\u017f \u212aelvin",
    [1894, 127, 253, 324, 42495, 17483, 127, 354, 328, 16384, 11231, 585, 6, 129, 379, 32859],
  ),
  (
    "Привет мир Ελληνικά العربية עברית हिन्दी",
    [
      26302,
      16370,
      29503,
      110,
      22176,
      141,
      480,
      38018,
      16701,
      141,
      478,
      138,
      113,
      138,
      119,
      138,
      119,
      138,
      115,
      138,
      121,
      138,
      117,
      138,
      118,
      138,
      361,
      12973,
      18843,
      10948,
      16378,
      12046,
      20915,
      147,
      95,
      147,
      239,
      147,
      101,
      147,
      247,
      147,
      359,
      29446,
      26721,
      26090,
      19389,
      29552,
      25751,
    ],
  ),
  (
    "e-mail: john.doe@example.com, url https://x.org/a?b=c&d=e",
    [
      324,
      268,
      2614,
      281,
      1742,
      269,
      13296,
      287,
      6228,
      269,
      2464,
      267,
      23464,
      30901,
      12441,
      343,
      269,
      5593,
      270,
      320,
      286,
      321,
      284,
      322,
      261,
      323,
      284,
      324,
    ],
  ),
  ("\x00null\x1bescape\x7f", [29358, 534, 12314]),
  (
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    [
      1642,
      2857,
      13093,
      2076,
      5868,
      26850,
      835,
      639,
      38466,
      28714,
      749,
      20253,
      9800,
      535,
      532,
      1065,
      901,
      1556,
      13697,
      9916,
      78,
      39031,
      13903,
    ],
  ),
  ("0123456789", [271, 272, 273, 274, 275, 276, 277, 278, 279, 280]),
  ("e\u0301clair cafe\u0301", [3459, 14039, 15304]),
  ("\xa0non-breaking\u3000ideographic\u2009thin space\xa0", [3353, 268, 2755, 1909, 78, 4245, 7847, 2138]),
  ("x", [343]),
  (
    "a close-up of a red fire-hydrant on the sidewalk, next to a bright yellow taxi (NYC) at dusk #photography",
    [
      320,
      2660,
      268,
      705,
      539,
      320,
      736,
      1769,
      268,
      8031,
      773,
      525,
      518,
      23278,
      267,
      1131,
      531,
      320,
      4852,
      4481,
      11380,
      263,
      2832,
      264,
      536,
      19708,
      258,
      2108,
    ],
  ),
]

LONG_TEXT = "a very long caption that keeps going " * 12
# open_clip 3.3.0's `tokenize(LONG_TEXT)[0]`: cut at 77 with EOT forced into the last slot.
LONG_ROW = [
  49406,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  6333,
  1245,
  320,
  1070,
  1538,
  11327,
  682,
  49407,
]


def _normalize(text):
  """CLIP's text cleaning, written out independently of the module under test."""
  return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


@pytest.fixture(scope="module")
def tokenizer():
  return tok.default_tokenizer()


def test_reference_cases_are_varied():
  assert len(REFERENCE) >= 20
  assert len({text for text, _ in REFERENCE}) == len(REFERENCE)


@pytest.mark.parametrize("text,expected", REFERENCE, ids=[f"case{i}" for i in range(len(REFERENCE))])
def test_encode_matches_reference(tokenizer, text, expected):
  assert tokenizer.encode(text) == expected


@pytest.mark.parametrize("text,expected", REFERENCE, ids=[f"case{i}" for i in range(len(REFERENCE))])
def test_row_matches_reference(text, expected):
  row = tok.tokenize(text)[0]
  want = [tok.SOT_ID, *expected, tok.EOT_ID]
  assert row[: len(want)].tolist() == want
  assert not row[len(want) :].any()


def test_overflow_is_truncated_with_eot_last(tokenizer):
  assert len(tokenizer.encode(LONG_TEXT)) > tok.CONTEXT_LENGTH
  row = tok.tokenize(LONG_TEXT)[0]
  assert row.tolist() == LONG_ROW
  assert row[-1] == tok.EOT_ID and (row == tok.EOT_ID).sum() == 1


def test_short_context_length(tokenizer):
  out = tokenizer("a photo of a cat.", context_length=5)
  assert out.tolist() == [[tok.SOT_ID, 320, 1125, 539, tok.EOT_ID]]
  assert tokenizer("", context_length=2).tolist() == [[tok.SOT_ID, tok.EOT_ID]]
  with pytest.raises(ValueError):
    tokenizer("a", context_length=1)


def test_shape_dtype_and_padding(tokenizer):
  out = tokenizer(["a cat", "", "a dog on a mat"])
  assert out.shape == (3, tok.CONTEXT_LENGTH) and out.dtype == np.int32
  assert out[1, :3].tolist() == [tok.SOT_ID, tok.EOT_ID, 0]
  assert out[0, :4].tolist() == [tok.SOT_ID, 320, 2368, tok.EOT_ID]
  assert not out[0, 4:].any()
  assert tokenizer("a cat").shape == (1, tok.CONTEXT_LENGTH)
  assert tokenizer([]).shape == (0, tok.CONTEXT_LENGTH)
  assert tokenizer(("a cat",), context_length=16).shape == (1, 16)


def test_batch_equals_per_string(tokenizer):
  texts = [text for text, _ in REFERENCE] + [LONG_TEXT]
  batch = tok.tokenize(texts)
  for i, text in enumerate(texts):
    np.testing.assert_array_equal(batch[i], tok.tokenize(text)[0])


@pytest.mark.parametrize("text,expected", REFERENCE, ids=[f"case{i}" for i in range(len(REFERENCE))])
def test_decode_round_trips_normalized_text(tokenizer, text, expected):
  # Decoding puts a space after every word piece boundary, so compare without spaces.
  assert tokenizer.decode(expected).replace(" ", "") == _normalize(text).replace(" ", "")


def test_decode_exact(tokenizer):
  assert tokenizer.decode(tokenizer.encode("A  photo of\tthe CAT")) == "a photo of the cat "
  assert tokenizer.decode(np.array([320, 2368], dtype=np.int32)) == "a cat "
  assert tokenizer.decode([]) == ""
  assert tokenizer.decode([tok.SOT_ID, 320, tok.EOT_ID]) == "<|startoftext|>a <|endoftext|>"


def test_vocabulary(tokenizer):
  assert tokenizer.vocab_size == len(tokenizer.vocab) == 49408
  assert len(set(tokenizer.vocab)) == 49408
  assert tok.EOT_ID == tokenizer.vocab_size - 1 and tok.SOT_ID == tok.EOT_ID - 1
  assert tokenizer.vocab[tok.SOT_ID] == "<|startoftext|>"
  assert tokenizer.vocab[tok.EOT_ID] == "<|endoftext|>"
  ids = tok.tokenize([text for text, _ in REFERENCE])
  assert ids.max() == tok.EOT_ID and ids.min() == 0


def test_special_token_text_maps_to_special_id(tokenizer):
  # OpenAI's pre-tokenization regex treats these literals as single tokens; open_clip renamed
  # its specials, so this behaviour is pinned from OpenAI's pattern rather than open_clip.
  assert tokenizer.encode("<|endoftext|>") == [tok.EOT_ID]
  assert tokenizer.encode("A <|startoftext|>") == [320, tok.SOT_ID]


def test_fast_path_is_exact():
  # The tokenizer skips ftfy/unescape for printable ASCII without '&'; fail loudly if a future
  # ftfy starts changing such text.
  rng = random.Random(0)
  alphabet = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
  samples = [text for text, _ in REFERENCE if text.isascii() and text.isprintable() and "&" not in text]
  samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(2000)]
  samples += ["<b>bold</b> -- 'quoted' \"x\" `y` ~z~ ^_^ |a|", "lt;gt;amp;", "\\x1b[31m"]
  for text in samples:
    assert html.unescape(html.unescape(ftfy.fix_text(text))) == text, text


def test_ascii_split_matches_unicode_split():
  # Cleaned ASCII text goes through a faster stdlib pattern; it must split exactly the same way.
  rng = random.Random(1)
  alphabet = "abcxyz019 .,'!?-&<>|/_" + "".join(chr(c) for c in range(0x21, 0x7F))
  samples = [_normalize(text) for text, _ in REFERENCE] + [_normalize(LONG_TEXT)]
  samples += [_normalize("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))) for _ in range(2000)]
  samples += ["it's we'd they'll i'm you're we've don't 'd's", "<|startoftext|>a<|endoftext|>b <|end"]
  for text in samples:
    if text.isascii():
      assert tok._ASCII_WORD_PATTERN.findall(text) == tok._WORD_PATTERN.findall(text), text


def test_word_cache_reset_keeps_results():
  small = tok.Tokenizer(cache_size=3)
  for text, expected in REFERENCE:
    assert small.encode(text) == expected
  assert len(small._cache) <= 3


def test_default_tokenizer_is_shared():
  assert tok.default_tokenizer() is tok.default_tokenizer()
