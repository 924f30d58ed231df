"""The `qwen2vl` chat template: conversation -> input_ids and labels.

The text is exactly what Qwen2-VL's Jinja chat template renders; it is tokenized once
with a single `<|image_pad|>` per image (`<|video_pad|>` per video clip), then each pad is
repeated grid_t*grid_h*grid_w / merge^2 times. Special tokens split the text before BPE, so this
equals tokenizing the fully expanded text, as Qwen2VLProcessor does. Labels come from
character offsets.

Answers are tokenized on their own: the text is cut right after each
`<|im_start|>assistant\n` and each piece is encoded separately (as LLaMA-Factory encodes
turns). Generation is prompted with exactly the tokens of `...<|im_start|>assistant\n` and
must produce the answer from there, so training has to teach the answer's own tokens. With
one encode of the whole text, an answer starting with a newline would merge with the
head's `\n` into one `\n\n` token spanning prompt and answer, which is masked, so the
newline would never be trained. Only such merges (answers starting with a newline) differ
from HF's apply_chat_template tokenization of the whole conversation; everywhere else the
pre-tokenizer already splits at that point and the ids are identical.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from mindspeed_mm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mindspeed_mm.data.formats import Conversation

DEFAULT_SYSTEM = "You are a helpful assistant."
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"


@dataclass
class Encoded:
    input_ids: np.ndarray   # int32 [s]
    labels: np.ndarray      # int32 [s], IGNORE_INDEX where not supervised


class Qwen2VLTemplate:
    def __init__(self, tokenizer, train_on_prompt: bool = False, mask_history: bool = False):
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: offsets at no extra cost
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")}
        self.image_token_id, self.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        self.vision_token_ids = np.array(list(ids.values()), dtype=np.int32)
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]], list[int]]:
        """Chat text with one pad per image / video, the supervised character spans, and the
        character positions where answers start (the text is encoded in pieces cut there)."""
        parts, spans, cuts, pos = [], [], [], 0
        turns = conv.messages
        if turns[0][0] != "system":
            turns = [("system", DEFAULT_SYSTEM)] + turns
        last_user = max(i for i, (r, _) in enumerate(turns) if r == "user")
        for i, (role, content) in enumerate(turns):
            head = f"<|im_start|>{role}\n"
            body = content.replace(IMAGE_PLACEHOLDER, VISION_BLOCK).replace(VIDEO_PLACEHOLDER, VIDEO_BLOCK) + "<|im_end|>\n"
            start = pos + len(head)
            if self.train_on_prompt:
                start = pos
                supervised = not self.mask_history or i >= last_user
            else:
                supervised = role == "assistant" and (not self.mask_history or i > last_user)
            if supervised:
                spans.append((start, pos + len(head) + len(body)))
            if role == "assistant":
                cuts.append(pos + len(head))
            parts += [head, body]
            pos += len(head) + len(body)
        return "".join(parts), spans, cuts

    def encode(self, conv: Conversation, image_token_counts: list[int], video_token_counts: list[int] = ()) -> Encoded:
        text, spans, cuts = self.render(conv)
        bounds = [0] + cuts + [len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        encs = self.backend.encode_batch(pieces, add_special_tokens=False)
        ids = np.asarray([i for e in encs for i in e.ids], dtype=np.int32)
        offsets = [a + base for e, base in zip(encs, bounds) for a, _ in e.offsets]
        starts = [s for s, _ in spans]
        sup = np.zeros(len(ids), dtype=bool)
        for t, a in enumerate(offsets):
            k = bisect_right(starts, a) - 1
            sup[t] = k >= 0 and a < spans[k][1]
        repeats = np.ones(len(ids), dtype=np.int64)
        for kind, token, counts in (("image", self.image_token_id, image_token_counts),
                                    ("video", self.video_token_id, video_token_counts)):
            pads = np.flatnonzero(ids == token)
            if len(pads) != len(counts):
                raise ValueError(f"{len(pads)} {kind} pads in text for {len(counts)} {kind}s")
            repeats[pads] = counts
        ids, sup = np.repeat(ids, repeats), np.repeat(sup, repeats)
        sup &= ~np.isin(ids, self.vision_token_ids)  # vision tokens are inputs, never targets
        labels = np.where(sup, ids, IGNORE_INDEX).astype(np.int32)
        return Encoded(ids, labels)
