"""The annotation pipeline end to end on tiny random LLaVA and OWLv2 models built offline.

The models are built from transformers configs with random weights, saved with processors whose
tokenizers are made from small word vocabularies, and loaded back by the CLI like hub checkpoints.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.extras
torch = pytest.importorskip("torch", reason="annotation needs the extra: requirements-annotate.txt")
transformers = pytest.importorskip("transformers", reason="annotation needs the extra: requirements-annotate.txt")
tokenizers = pytest.importorskip("tokenizers", reason="comes with transformers")

# pylint: disable=wrong-import-position
from grain_jax import errors
from grain_jax.annotate import __main__ as cli
from grain_jax.annotate import hf, mllm, parse, run
from grain_jax.data import pipeline, quality, records

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Every token the tiny LLaVA may generate is a whole line of a loosely formatted answer.
_ANSWER_LINES = [
  "\nCaption: a red square on grass",
  "\n- a red square",
  "\n* 1. Blue sky.",
  "\n2) a red square",
  "\n",
  "\nFeatures:",
  "\n- a green circle",
  "\n- **grass**",
]
_CHAT_TEMPLATE = (
  "{% for m in messages %}USER: {% for c in m['content'] %}"
  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
  "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_SIDE, _PATCH = 32, 8
_NEW_TOKENS = 6  # fewer than the answer lines: no line is repeated


def _word_tokenizer(words, clip_like=False, **special_tokens):
  """A word-level tokenizer; `clip_like` lower-cases and wraps texts in <s> ... </s> as CLIP's."""
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  if clip_like:
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=words[0], **special_tokens)


def _save_tiny_llava(path):
  from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

  tokenizer = _word_tokenizer(
    _SPECIAL + _ANSWER_LINES,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    extra_special_tokens={"image_token": "<image>"},
  )
  processor = transformers.LlavaProcessor(
    image_processor=LlavaImageProcessorPil(size={"shortest_edge": _SIDE}, crop_size={"height": _SIDE, "width": _SIDE}),
    tokenizer=tokenizer,
    patch_size=_PATCH,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    chat_template=_CHAT_TEMPLATE,
  )
  config = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=_SIDE,
      patch_size=_PATCH,
      projection_dim=16,
    ),
    text_config=transformers.LlamaConfig(
      vocab_size=len(_SPECIAL + _ANSWER_LINES),
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=2,
      max_position_embeddings=128,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=3,
    ),
    image_token_id=_SPECIAL.index("<image>"),
    vision_feature_select_strategy="default",
  )
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config)
  # A random model may end at once or emit <image>, and repeats one token: here it writes a
  # mix of distinct answer lines (with repeats after cleaning, e.g. "- a red square", "2) a red
  # square"), which makes captions, bullets and duplicates reach the parser.
  model.generation_config.suppress_tokens = list(range(len(_SPECIAL)))
  model.generation_config.no_repeat_ngram_size = 1
  model.save_pretrained(path)
  processor.save_pretrained(path)


def _save_tiny_owlv2(path):
  from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

  words = ["<unk>", "<s>", "</s>", "!", "a", "red", "square", "blue", "sky", "green", "circle", "grass"]
  tokenizer = _word_tokenizer(
    words, clip_like=True, bos_token="<s>", eos_token="</s>", pad_token="!", model_max_length=8
  )
  processor = transformers.Owlv2Processor(
    image_processor=Owlv2ImageProcessorPil(size={"height": _SIDE, "width": _SIDE}), tokenizer=tokenizer
  )
  layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
  config = transformers.Owlv2Config(
    text_config=dict(
      vocab_size=len(words), max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=3, **layers
    ),
    vision_config=dict(image_size=_SIDE, patch_size=_PATCH, **layers),
    projection_dim=16,
  )
  torch.manual_seed(1)
  transformers.Owlv2ForObjectDetection(config).save_pretrained(path)
  processor.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  # Tiny models gain nothing from threads, and lose much on a CPU shared with other jobs.
  torch.set_num_threads(1)
  root = tmp_path_factory.mktemp("models")
  _save_tiny_llava(str(root / "llava"))
  _save_tiny_owlv2(str(root / "owlv2"))
  return str(root / "llava"), str(root / "owlv2")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Five image files: alt-text from captions.csv (a), a sidecar .txt (sub/b), none (c, d);
  corrupt.png does not decode."""
  root = tmp_path_factory.mktemp("images")
  os.makedirs(root / "sub")
  for name, size, color in [
    ("a.png", (40, 30), (200, 30, 30)),
    ("sub/b.jpg", (30, 50), (0, 90, 0)),
    ("c.png", (32, 32), (20, 20, 220)),
    ("d.png", (64, 16), (9, 9, 9)),
  ]:
    Image.new("RGB", size, color).save(root / name)
  (root / "corrupt.png").write_bytes(b"\x89PNG garbage")
  (root / "sub" / "b.txt").write_text("alt text of b\n")
  (root / "captions.csv").write_text("a.png,alt text of a, with a comma\n")
  return root


def _argv(images, models, out, *extra):
  return [
    "--images",
    str(images),
    "--captions",
    str(images / "captions.csv"),
    "--out",
    str(out),
    "--mllm",
    models[0],
    "--detector",
    models[1],
    "--batch-size",
    "2",
    "--shard-size",
    "2",
    "--max-new-tokens",
    str(_NEW_TOKENS),
    "--max-bad-fraction",
    "0.5",
    "--workers",
    "2",
    *extra,
  ]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_models, images):
  out = tmp_path_factory.mktemp("annotated") / "out"
  assert cli.main(_argv(images, tiny_models, out)) == 0
  return out


def _hf_regions(detector_dir, image_bytes, descriptions, threshold):
  """The record's regions as transformers' own OWLv2 post-processing finds them."""
  processor = transformers.AutoProcessor.from_pretrained(detector_dir)
  model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir)
  image = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((_SIDE, _SIDE), Image.BICUBIC)
  inputs = processor(text=[descriptions], images=[image], truncation=True, return_tensors="pt")
  with torch.no_grad():
    outputs = model(**inputs)
  found = processor.post_process_grounded_object_detection(outputs, threshold=threshold, text_labels=[descriptions])[0]
  regions = [
    records.Region(text, tuple(box.tolist()), float(score))
    for text, box, score in zip(found["text_labels"], found["boxes"], found["scores"])
  ]
  return sorted(quality.clean_regions(regions)[0], key=lambda r: -r.score)


def test_folder_to_records_the_training_pipeline_reads(annotated, tiny_models, images, capsys):
  manifest = records.read_manifest(str(annotated))
  assert manifest["skipped"] == {quality.CORRUPT_IMAGE: 1}
  written = {r.key: r for r in records.read_records(str(annotated))}
  keys = ["a.png", "c.png", "d.png", "sub/b.jpg"]
  # The same batches as the run (shards of 2 with corrupt.png skipped), parsed independently.
  describer = mllm.Describer(tiny_models[0], device="cpu", max_new_tokens=_NEW_TOKENS)
  batches = [["a.png", "c.png"], ["d.png"], ["sub/b.jpg"]]
  answers = {}
  for batch in batches:
    pixels = [Image.open(images / key).convert("RGB") for key in batch]
    answers.update(zip(batch, describer.describe(pixels)))
  alt_texts = {"a.png": "alt text of a, with a comma", "sub/b.jpg": "alt text of b"}
  expected_keys = [k for k in keys if alt_texts.get(k) or parse.parse_response(answers[k])[0]]
  assert sorted(written) == expected_keys and manifest["count"] == len(expected_keys)
  total_regions = 0
  for key, record in written.items():
    caption, descriptions = parse.parse_response(answers[key])
    assert (record.caption, record.mllm_caption) == (alt_texts.get(key, ""), caption)
    expected = _hf_regions(tiny_models[1], record.image, descriptions, 0.3)
    assert [r.description for r in record.regions] == [r.description for r in expected]
    np.testing.assert_allclose([r.box for r in record.regions], [r.box for r in expected], atol=1e-5)
    np.testing.assert_allclose([r.score for r in record.regions], [r.score for r in expected], atol=1e-5)
    total_regions += len(record.regions)
  assert total_regions > 0  # the comparison above checked boxes, not only empty lists
  batch = next(
    iter(
      pipeline.train_dataset(
        str(annotated),
        global_batch_size=2,
        image_size=32,
        num_regions=5,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
      )
    )
  )
  assert batch["image"].shape == (2, 32, 32, 3) and batch["boxes"].shape == (2, 5, 4)


def test_chunks_resume_and_changed_settings(tmp_path, annotated, tiny_models, images, monkeypatch):
  out = tmp_path / "chunked"
  chunk = lambda i: _argv(images, tiny_models, out, "--num-chunks", "2", "--chunk-index", str(i))
  assert run.annotate(cli.parse_args(chunk(1))) is None  # shard 1 of 0-2: not complete yet
  assert not (out / records.MANIFEST).exists()
  assert cli.main(chunk(0)) == 0
  expected = list(records.read_records(str(annotated)))
  assert list(records.read_records(str(out))) == expected
  # As if the run had died while writing shard 1 (corrupt.png, d.png).
  os.remove(out / run.PROGRESS_DIR / "shard-00001.json")
  os.remove(out / records.shard_name(1))
  seen = []
  annotate_batch = run.annotate_batch
  monkeypatch.setattr(
    run,
    "annotate_batch",
    lambda batch, *args: (seen.append([item.key for item in batch]), annotate_batch(batch, *args))[1],
  )
  assert cli.main(_argv(images, tiny_models, out)) == 0
  assert seen == [["d.png"]]  # finished shards are not annotated again
  assert list(records.read_records(str(out))) == expected
  assert json.loads((out / records.MANIFEST).read_text()) == json.loads((annotated / records.MANIFEST).read_text())
  with pytest.raises(errors.ArgumentError, match=r"other settings \(threshold differ"):
    run.annotate(cli.parse_args(_argv(images, tiny_models, out, "--threshold", "0.5")))


def test_a_record_dataset_is_annotated_again_keeping_images_and_alt_texts(tmp_path, annotated, tiny_models):
  out = tmp_path / "again"
  argv = [
    "--images",
    str(annotated),
    "--out",
    str(out),
    "--mllm",
    tiny_models[0],
    "--detector",
    tiny_models[1],
    "--max-new-tokens",
    str(_NEW_TOKENS),
  ]
  assert cli.main(argv) == 0
  before, after = records.read_records(str(annotated)), records.read_records(str(out))
  assert [(r.key, r.image, r.caption) for r in after] == [(r.key, r.image, r.caption) for r in before]
  with pytest.raises(errors.ArgumentError, match="--captions is for image folders"):
    run.annotate(cli.parse_args(argv + ["--captions", "captions.csv"]))


def test_bad_model_device_and_dtype_errors_name_the_flag(tmp_path):
  (tmp_path / "empty").mkdir()  # a directory without a model (a missing one would be a hub id)
  with pytest.raises(ValueError, match=r"cannot load '.*empty' as AutoModelForImageTextToText"):
    mllm.Describer(str(tmp_path / "empty"), device="cpu")
  with pytest.raises(ValueError, match="--dtype='float8'"):
    hf.device_and_dtype("cpu", "float8")
  if not torch.cuda.is_available():
    with pytest.raises(ValueError, match="--device=cuda but torch sees no GPU"):
      hf.device_and_dtype("cuda")
