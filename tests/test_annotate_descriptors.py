"""`python -m grain_jax.annotate descriptors` on a tiny random causal LM built offline: the file it
writes, resuming, and its refusals."""

import json
import os

import pytest

pytestmark = pytest.mark.extras
torch = pytest.importorskip("torch", reason="annotation needs the extra: requirements-annotate.txt")
transformers = pytest.importorskip("transformers", reason="annotation needs the extra: requirements-annotate.txt")
tokenizers = pytest.importorskip("tokenizers", reason="comes with transformers")

# pylint: disable=wrong-import-position
from grain_jax import errors
from grain_jax.annotate import __main__ as cli
from grain_jax.annotate import descriptors
from grain_jax.config import eval_rules
from grain_jax.eval import datasets
from grain_jax.eval import descriptors as descriptor_files

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
# Every token the model may generate is a piece of a loosely formatted answer: features, a
# numbered one, a blank line, the next question (where an answer ends).
_PIECES = [" a red roof", "\n- four wheels", "\n- a long tail", "\n2) striped fur", "\n", "\nQ: next", "\n- **a beak**"]
_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
  torch.set_num_threads(1)
  path = str(tmp_path_factory.mktemp("llm"))
  vocab = _SPECIAL + _PIECES
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
  ).save_pretrained(path)
  config = transformers.LlamaConfig(
    vocab_size=len(vocab),
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
  )
  torch.manual_seed(0)
  llm = transformers.LlamaForCausalLM(config)
  llm.generation_config.suppress_tokens = list(range(len(_SPECIAL)))  # never end at once
  llm.generation_config.no_repeat_ngram_size = 1
  llm.save_pretrained(path)
  return path


def _expected(llm_dir, names, max_descriptors):
  """Each class's features by transformers alone: greedy answers, "-" / "2)" lines up to a blank or Q: line."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(llm_dir)
  expected = {}
  for name in names:
    ids = tokenizer(descriptors.prompt(name), return_tensors="pt")
    answer = tokenizer.decode(
      model.generate(**ids, max_new_tokens=_NEW_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1] :],
      skip_special_tokens=True,
    )
    features = []
    for line in ("-" + answer).split("\n"):
      if not line.strip() or line.strip().startswith("Q:"):
        break
      feature = line.strip().removeprefix("-").removeprefix("2)").replace("**", "").strip()
      if feature and feature.lower() not in [f.lower() for f in features]:
        features.append(feature)
    expected[name] = features[:max_descriptors]
  return expected


def _argv(out, llm, *extra):
  return [
    "descriptors",
    "--out",
    str(out),
    "--llm",
    llm,
    "--max-new-tokens",
    str(_NEW_TOKENS),
    "--batch-size",
    "3",
    "--device",
    "cpu",
    *extra,
  ]


def test_a_registry_set_gets_a_file_evaluation_pairs_by_name(tmp_path, tiny_llm):
  assert cli.main(_argv(tmp_path, tiny_llm, "--dataset", "cifar10")) == 0
  path = tmp_path / "descriptors_cifar10.json"
  written = json.loads(path.read_text())
  names = datasets.class_list("cifar10.txt")
  assert list(written) == names
  assert written == _expected(tiny_llm, names, 10)
  assert any(written.values())  # the random model's answers do hold features
  raw, _ = descriptor_files.read(str(path))
  assert {p.how for p in descriptor_files.pair(list(raw), names)} == {"name"}
  eval_rules.check_descriptors(("cifar10",), str(tmp_path), allow_missing=False)


def test_resumes_from_the_finished_classes_and_refuses_other_settings(tmp_path, tiny_llm, monkeypatch):
  (tmp_path / "classes.txt").write_text("zebra crossing\nowl\nteapot\napple\nkite\n")
  argv = _argv(tmp_path, tiny_llm, "--classes", str(tmp_path / "classes.txt"), "--max-descriptors", "2")
  assert cli.main(argv) == 0
  first = json.loads((tmp_path / "descriptors.json").read_text())
  assert first == _expected(tiny_llm, list(first), 2)
  progress = tmp_path / "descriptors.json.partial.jsonl"
  lines = progress.read_text().splitlines()
  assert len(lines) == 1 + 5
  # A run killed after three classes, in the middle of writing the fourth line.
  progress.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
  os.remove(tmp_path / "descriptors.json")
  asked = []
  answer = descriptors.Writer.answer
  monkeypatch.setattr(descriptors.Writer, "answer", lambda self, names: asked.extend(names) or answer(self, names))
  assert cli.main(argv) == 0
  assert asked == ["apple", "kite"]
  assert json.loads((tmp_path / "descriptors.json").read_text()) == first
  assert cli.main(argv) == 0 and asked == ["apple", "kite"]  # finished: no model is loaded
  with pytest.raises(errors.ArgumentError, match="other settings"):
    descriptors.write_descriptors(descriptors.parse_args(argv[1:-2] + ["--max-descriptors", "3"]))


def test_refusals_name_the_flag(tmp_path, capsys):
  assert cli.main(["descriptors", "--dataset", "cub", "--out", str(tmp_path)]) == errors.USER_ERROR_STATUS
  assert "labels are ids" in capsys.readouterr().err
  (tmp_path / "empty.txt").write_text("\n")
  assert cli.main(["descriptors", "--classes", str(tmp_path / "empty.txt"), "--out", str(tmp_path)]) == 2
  assert "lists no class" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["descriptors", "--dataset", "not_a_set", "--out", str(tmp_path)])
