"""Conversations -> prompt token ids, exactly as Qwen2-VL's processor formats them.

``processor.apply_chat_template(messages, add_generation_prompt=True)`` is
the training template's text (mindspeed_mm/data/template.py: default system
turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per image, each pad
repeated once per merged patch) followed by ``<|im_start|>assistant\\n``.
Special tokens split the text before BPE, so the ids of the generation
prompt simply follow those of the conversation.

Every check (images readable, sizes allowed, prompt length) runs here,
before the model is loaded, and fails with one line naming the sample.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from mindspeed_mm.data.config import Attr
from mindspeed_mm.constants import IMAGE_PLACEHOLDER
from mindspeed_mm.data.formats import RESERVED_TEXT, Conversation, DropSample, parse_record
from mindspeed_mm.data.images import check_images, load_pixels
from mindspeed_mm.jsonio import load_json
from mindspeed_mm.data.template import Qwen2VLTemplate
from mindspeed_mm.errors import UserError

GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclass
class Prompt:
    input_ids: List[int]
    images: List[str]  # resolved paths, in placeholder order
    image_grid_thw: np.ndarray  # [n_images, 3]
    text: str  # the last user turn as given (with <image> placeholders)
    reference: Optional[str] = None  # the record's last assistant turn (batch files)


@dataclass
class PromptBatch:
    """Model inputs of some prompts: ids left-padded by the generator, pixels of all their images."""
    input_ids: List[List[int]]
    pixel_values: Optional[torch.Tensor]  # [n_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3], images of prompt 0 first


def chat_conversation(prompt: str, images: List[str], system: Optional[str] = None) -> Conversation:
    """One user turn.  Each image goes where an ``<image>`` stands in the prompt, in order, exactly as in an
    MLLM record (so ``<image>\\nQuestion`` is the training layout); a prompt without ``<image>`` gets all
    images before its text, with nothing in between."""
    if any(t in prompt for t in RESERVED_TEXT):
        raise UserError(f"--prompt: must not contain the vision tokens {', '.join(RESERVED_TEXT)}; "
                        f"mark where each --image goes with '{IMAGE_PLACEHOLDER}'")
    for path in images:
        if os.path.isdir(path):
            raise UserError(f"--image {path}: is a directory; give one image file per --image")
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise UserError(f"--prompt has {placeholders} '{IMAGE_PLACEHOLDER}' but {len(images)} --image given: "
                        f"give one --image per '{IMAGE_PLACEHOLDER}' (or no '{IMAGE_PLACEHOLDER}' to put the "
                        f"images first)")
    messages = [("system", system)] if system is not None else []
    messages.append(("user", prompt if placeholders else IMAGE_PLACEHOLDER * len(images) + prompt))
    return Conversation(messages, [os.path.abspath(p) for p in images])


def read_conversations(path: str, attr: Attr = None):
    """(conversation up to the last user turn, reference answer or None) per record of an MLLM file."""
    attr = attr or Attr()
    records = load_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records")
    media_dir = os.path.dirname(os.path.abspath(path))
    out = []
    for i, record in enumerate(records):
        messages = record.get(attr.messages) if isinstance(record, dict) else None
        ends_with_user = (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                          and messages[-1].get(attr.role_tag) == attr.user_tag)
        if ends_with_user:  # a question without a reference: check it as if it were answered
            record = dict(record, **{attr.messages: messages + [{attr.role_tag: attr.assistant_tag,
                                                                 attr.content_tag: ""}]})
        try:
            conv = parse_record(record, attr, media_dir)
        except DropSample as exc:
            raise UserError(f"{path}: sample {i}: {exc} ({exc.reason})") from None
        reference = None if ends_with_user else conv.messages[-1][1]
        out.append((Conversation(conv.messages[:-1], conv.images), reference))
    if not out:
        raise UserError(f"{path}: no records")
    return out


class PromptBuilder:
    """Conversations -> prompts, with the tokenizer and image processor of the HF folder."""

    def __init__(self, tokenizer, image_processor, max_length: int):
        self.template = Qwen2VLTemplate(tokenizer)
        self.image_processor = image_processor
        self.merge = image_processor.merge_size
        self.generation_prompt = tokenizer.backend_tokenizer.encode(GENERATION_PROMPT,
                                                                    add_special_tokens=False).ids
        self.max_length = max_length

    def build(self, conv: Conversation, where: str, reference: Optional[str] = None) -> Prompt:
        try:
            grids = check_images(conv.images, self.image_processor)
        except DropSample as exc:
            raise UserError(f"{where}: {exc}") from None
        counts = [t * h * w // self.merge ** 2 for t, h, w in grids]
        ids = self.template.encode(conv, counts).input_ids.tolist() + self.generation_prompt
        if len(ids) >= self.max_length:
            raise UserError(f"{where}: the prompt is {len(ids)} tokens, the model takes at most "
                            f"{self.max_length} (text.max_position_embeddings) including the answer")
        return Prompt(ids, conv.images, np.asarray(grids, dtype=np.int64).reshape(-1, 3), conv.messages[-1][1],
                      reference)

    def batch(self, prompts: List[Prompt]) -> PromptBatch:
        images = [p for prompt in prompts for p in prompt.images]
        pixels = grids = None
        if images:
            pixel_values, grid_thw = load_pixels(images, self.image_processor)
            pixels, grids = torch.from_numpy(np.asarray(pixel_values)), torch.from_numpy(np.asarray(grid_thw))
        return PromptBatch([p.input_ids for p in prompts], pixels, grids)
