"""Conversations -> prompt token ids, exactly as Qwen2-VL's processor formats them.

``processor.apply_chat_template(messages, add_generation_prompt=True)`` is
the training template's text (mindspeed_mm/data/template.py: default system
turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per image and
``<|vision_start|><|video_pad|><|vision_end|>`` per video clip, each pad
repeated once per merged patch) followed by ``<|im_start|>assistant\\n``.
Special tokens split the text before BPE, so the ids of the generation
prompt simply follow those of the conversation.

Every check (images and clips readable, sizes allowed, prompt length) runs here,
before the model is loaded, and fails with one line naming the sample.
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from mindspeed_mm.data.config import Attr
from mindspeed_mm.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mindspeed_mm.data.formats import RESERVED_TEXT, Conversation, DropSample, parse_record
from mindspeed_mm.data.images import check_images, load_pixels
from mindspeed_mm.data.video import VideoSettings, load_videos, probe, video_grid
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
    videos: List[str] = field(default_factory=list)  # resolved clip paths, in <video> order
    video_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


@dataclass
class PromptBatch:
    """Model inputs of some prompts: ids left-padded by the generator, pixels of all their images."""
    input_ids: List[List[int]]
    pixel_values: Optional[torch.Tensor]  # [n_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor]  # [n_images, 3], images of prompt 0 first
    pixel_values_videos: Optional[torch.Tensor] = None  # [n_video_patches, C*T*P*P]
    video_grid_thw: Optional[torch.Tensor] = None  # [n_videos, 3], clips of prompt 0 first
    second_per_grid_ts: Optional[torch.Tensor] = None  # [n_videos]: seconds per temporal patch (Qwen2.5-VL)


def chat_conversation(prompt: str, images: List[str], system: Optional[str] = None,
                      videos: List[str] = ()) -> Conversation:
    """One user turn.  Each image goes where an ``<image>`` stands in the prompt, in order, exactly as in an
    MLLM record (so ``<image>\\nQuestion`` is the training layout); a prompt without ``<image>`` gets all
    images before its text, with nothing in between.  Video clips likewise with ``<video>`` (without one:
    after the images, before the text)."""
    if any(t in prompt for t in RESERVED_TEXT):
        raise UserError(f"--prompt: must not contain the vision tokens {', '.join(RESERVED_TEXT)}; "
                        f"mark where each --image goes with '{IMAGE_PLACEHOLDER}' and each --video with "
                        f"'{VIDEO_PLACEHOLDER}'")
    lead = ""
    for flag, paths, mark in (("--image", images, IMAGE_PLACEHOLDER), ("--video", videos, VIDEO_PLACEHOLDER)):
        for path in paths:
            if os.path.isdir(path):
                raise UserError(f"{flag} {path}: is a directory; give one file per {flag}")
        placeholders = prompt.count(mark)
        if placeholders and placeholders != len(paths):
            raise UserError(f"--prompt has {placeholders} '{mark}' but {len(paths)} {flag} given: give one "
                            f"{flag} per '{mark}' (or no '{mark}' to put them first)")
        lead += "" if placeholders else mark * len(paths)
    messages = [("system", system)] if system is not None else []
    messages.append(("user", lead + prompt))
    return Conversation(messages, [os.path.abspath(p) for p in images], [os.path.abspath(p) for p in videos])


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
        out.append((Conversation(conv.messages[:-1], conv.images, conv.videos), reference))
    if not out:
        raise UserError(f"{path}: no records")
    return out


class PromptBuilder:
    """Conversations -> prompts, with the tokenizer and image processor of the HF folder."""

    def __init__(self, tokenizer, image_processor, max_length: int, video: VideoSettings = VideoSettings()):
        self.template = Qwen2VLTemplate(tokenizer)
        self.image_processor, self.video = image_processor, video
        self.merge = image_processor.merge_size
        self.generation_prompt = tokenizer.backend_tokenizer.encode(GENERATION_PROMPT,
                                                                    add_special_tokens=False).ids
        self.max_length = max_length

    def build(self, conv: Conversation, where: str, reference: Optional[str] = None) -> Prompt:
        ip = self.image_processor
        try:
            grids = check_images(conv.images, ip)
            video_grids = [video_grid(probe(p), self.video, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
                           for p in conv.videos]
        except DropSample as exc:
            raise UserError(f"{where}: {exc} ({exc.reason})") from None
        tokens = lambda gs: [t * h * w // self.merge ** 2 for t, h, w in gs]  # noqa: E731
        ids = self.template.encode(conv, tokens(grids), tokens(video_grids)).input_ids.tolist() + self.generation_prompt
        if len(ids) >= self.max_length:
            videos = f" ({sum(tokens(video_grids))} of them video: lower --video-fps / --video-max-pixels)" \
                if video_grids else ""
            raise UserError(f"{where}: the prompt is {len(ids)} tokens{videos}, the model takes at most "
                            f"{self.max_length} (text.max_position_embeddings) including the answer")
        as_array = lambda gs: np.asarray(gs, dtype=np.int64).reshape(-1, 3)  # noqa: E731
        return Prompt(ids, conv.images, as_array(grids), conv.messages[-1][1], reference, conv.videos,
                      as_array(video_grids))

    def batch(self, prompts: List[Prompt]) -> PromptBatch:
        images = [p for prompt in prompts for p in prompt.images]
        pixels = grids = None
        if images:
            pixel_values, grid_thw = load_pixels(images, self.image_processor)
            pixels, grids = torch.from_numpy(np.asarray(pixel_values)), torch.from_numpy(np.asarray(grid_thw))
        videos = [p for prompt in prompts for p in prompt.videos]
        video_pixels = video_grids = seconds = None
        if videos:
            try:
                clip_pixels, clip_grids, clip_seconds = load_videos(videos, self.video, self.image_processor)
            except DropSample as exc:  # a clip that probed fine but does not decode
                raise UserError(f"{exc} ({exc.reason})") from None
            video_pixels, video_grids = torch.from_numpy(clip_pixels), torch.from_numpy(clip_grids)
            seconds = torch.tensor(clip_seconds, dtype=torch.float32)
        return PromptBatch([p.input_ids for p in prompts], pixels, grids, video_pixels, video_grids, seconds)
