"""MLLM records (data.json `attr` names) -> a checked conversation, or a drop reason."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mindspeed_mm.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from mindspeed_mm.data.config import Attr
from mindspeed_mm.jsonio import has_bad_text

# Literal vision tokens in user text would be read as extra images by the tokenizer.
RESERVED_TEXT = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Every reason a sample can be dropped for, in the order the summary lists them.
DROP_REASONS = (
    "bad_record", "bad_text", "unknown_role", "bad_conversation", "image_count_mismatch",
    "missing_image", "corrupt_image", "bad_aspect_ratio", "video_count_mismatch", "missing_video",
    "corrupt_video", "no_frames", "video_too_long", "too_long",
)


class DropSample(Exception):
    """A sample that cannot be trained on; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in DROP_REASONS, reason
        super().__init__(detail)
        self.reason = reason


@dataclass
class Conversation:
    messages: list[tuple[str, str]]  # (role in {"system", "user", "assistant"}, content)
    images: list[str]                # resolved file paths, in <image> order
    videos: list[str] = field(default_factory=list)  # resolved clip paths, in <video> order


def resolve_path(path: str, base_dir: str) -> str:
    """Absolute paths as they are; relative ones from the working directory when the file
    is there (the guide writes './data/...'), else from `base_dir` (data.json dataset_dir)."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.abspath(os.path.join(base_dir, path))


def parse_record(record, attr: Attr, media_dir: str) -> Conversation:
    """Check one record's structure and text; raise DropSample with the reason."""
    if not isinstance(record, dict):
        raise DropSample("bad_record", "record is not an object")
    raw_messages = record.get(attr.messages)
    if not isinstance(raw_messages, list) or not raw_messages:
        raise DropSample("bad_conversation", f"'{attr.messages}' is missing or empty")
    images, videos = (_paths(record, key) for key in (attr.images, attr.videos))

    roles = {attr.user_tag: "user", attr.assistant_tag: "assistant"}
    if attr.system_tag:
        roles[attr.system_tag] = "system"
    messages = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict) or not isinstance(m.get(attr.content_tag), str):
            raise DropSample("bad_record", f"message {i} has no text '{attr.content_tag}'")
        role, content = roles.get(m.get(attr.role_tag)), m[attr.content_tag]
        if role is None:
            raise DropSample("unknown_role", f"message {i} has role {m.get(attr.role_tag)!r}")
        if has_bad_text(content) or any(t in content for t in RESERVED_TEXT):
            raise DropSample("bad_text", f"message {i} has non-UTF-8 text or reserved vision tokens")
        messages.append((role, content))

    body = messages[1:] if messages[0][0] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or len(body) % 2 or [r for r, _ in body] != expected:
        raise DropSample("bad_conversation", "turns must alternate user/assistant after an optional "
                         "system turn and end with assistant")
    return Conversation(messages, _resolve(messages, images, "image", IMAGE_PLACEHOLDER, media_dir),
                        _resolve(messages, videos, "video", VIDEO_PLACEHOLDER, media_dir))


def _paths(record: dict, key: str) -> list:
    paths = record.get(key) or []
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise DropSample("bad_record", f"'{key}' is not a list of paths")
    return paths


def _resolve(messages, paths: list, kind: str, placeholder: str, media_dir: str) -> list[str]:
    """The media files of one kind, checked against their placeholders and found on disk."""
    n_placeholders = sum(c.count(placeholder) for _, c in messages)
    if n_placeholders != len(paths):
        raise DropSample(f"{kind}_count_mismatch", f"{n_placeholders} {placeholder} placeholders, {len(paths)} {kind}s")
    if any(has_bad_text(p) for p in paths):
        raise DropSample("bad_text", f"{kind} path is not valid UTF-8")
    resolved = [resolve_path(p, media_dir) for p in paths]
    for given, path in zip(paths, resolved):
        if not os.path.isfile(path):
            # The path as written and both places tried, not dataset_dir joined onto a
            # path that often already starts with it.
            where = "" if os.path.isabs(given) else f" (looked in the working directory and in dataset_dir {media_dir!r})"
            raise DropSample(f"missing_{kind}", f"{kind} {given!r} not found{where}")
    return resolved
