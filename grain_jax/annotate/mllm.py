"""Stage 1: a multimodal LLM writes a caption and a list of visual descriptions per image.

Any image-text-to-text model of transformers with a chat template works (LLaVA-family by default).
Decoding is greedy, so the annotation of an image does not depend on a seed.
"""

from collections.abc import Sequence
from typing import Any

from PIL import Image

from grain_jax.annotate import hf

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
# The descriptions become OWLv2 text queries and region targets: short noun phrases of things
# that can be boxed, as in the reference's descriptions ("black glossy plumage").
PROMPT = (
  "Describe this image in two parts.\n"
  'First, one line that starts with "Caption:" followed by one sentence describing the whole '
  "image.\n"
  'Then a line "Features:" followed by a bullet list, one "- " line each, of up to 10 short, '
  "distinctive visual features of the objects in the image (a noun phrase of at most 8 words "
  'each, for something that can be outlined with a box), for example "- a red umbrella" or '
  '"- the dog\'s black ears".'
)


class Describer:
  """Runs the MLLM on batches of images; `describe` returns its raw answers."""

  def __init__(
    self, model_id: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256
  ):
    self.torch, _ = hf.import_torch_and_transformers()
    self.device, self.dtype = hf.device_and_dtype(device, dtype)
    self.processor, self.model = hf.load("AutoModelForImageTextToText", model_id, self.device, self.dtype)
    tokenizer = self.processor.tokenizer
    # Decoder-only generation continues each row from its last token: pad on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
      tokenizer.pad_token = tokenizer.eos_token
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
    self.max_new_tokens = max_new_tokens

  def describe(self, images: Sequence[Image.Image]) -> list[str]:
    """The model's answer to the prompt for each of the RGB `images`, special tokens removed."""
    inputs: Any = self.processor(
      images=list(images), text=[self.prompt] * len(images), padding=True, return_tensors="pt"
    )
    inputs = inputs.to(device=self.device, dtype=self.dtype)
    with self.torch.inference_mode():
      tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    answers = tokens[:, inputs["input_ids"].shape[1] :]
    return self.processor.batch_decode(answers, skip_special_tokens=True)
