"""LLaVA-Instruct-150K records -> the MLLM format that data.json reads.

A LLaVA record: {"id", "image": "<file in COCO train2017>", "conversations":
[{"from": "human"|"gpt", "value": "..."}]}. An MLLM record: {"images": [path],
"messages": [{"role": "user"|"assistant", "content": "..."}]}; the `<image>`
placeholder stays in the text.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from mindspeed_mm.constants import IMAGE_PLACEHOLDER
from mindspeed_mm.jsonio import DataFileError, load_json, write_json_atomic

ROLE_MAP = {"human": "user", "gpt": "assistant"}
MAX_REPORTS_PER_REASON = 20


@dataclass
class ConvertStats:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"written {self.written}, skipped {sum(self.skipped.values())} ({reasons})"


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _convert_messages(conversations) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise _Skip("malformed", "conversations is empty or not a list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _Skip("malformed", f"turn {i} has no text 'value'")
        role = ROLE_MAP.get(turn.get("from"))
        if role is None:
            raise _Skip("unknown_role", f"turn {i} has role {turn.get('from')!r}")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise _Skip("malformed", f"turn {i} is {turn.get('from')!r}, expected turns to alternate from human")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise _Skip("malformed", "conversation does not end with a gpt turn")
    return messages


class _ImageIndex:
    """Existence checks for image files; one directory listing instead of 150K stats."""

    def __init__(self, image_dir: str):
        self.image_dir = image_dir
        try:
            self.names = set(os.listdir(image_dir))
        except OSError:
            self.names = set()

    def exists(self, name: str) -> bool:
        if "/" in name or os.sep in name:
            return os.path.isfile(os.path.join(self.image_dir, name))
        return name in self.names


def convert_records(records, image_dir: str, report=None) -> tuple[list[dict], ConvertStats]:
    """Convert LLaVA records; `report(reason, id, detail)` is called for each skip."""
    if not isinstance(records, list):
        raise DataFileError("top level is not a JSON list of records")
    images = _ImageIndex(image_dir)
    stats, out = ConvertStats(), []
    for n, rec in enumerate(records):
        rid = rec.get("id", f"#{n}") if isinstance(rec, dict) else f"#{n}"
        try:
            if not isinstance(rec, dict):
                raise _Skip("malformed", "record is not an object")
            messages = _convert_messages(rec.get("conversations"))
            image = rec.get("image")
            n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
            if image is not None and not isinstance(image, str):
                raise _Skip("malformed", "'image' is not a file name")
            if n_placeholders != (1 if image else 0):
                raise _Skip("malformed", f"{n_placeholders} <image> placeholders for {1 if image else 0} image")
            if image and not images.exists(image):
                raise _Skip("missing_image", f"{os.path.join(image_dir, image)} not found")
        except _Skip as skip:
            stats.skipped[skip.reason] += 1
            if report:
                report(skip.reason, rid, str(skip))
            continue
        out.append({"images": [os.path.join(image_dir, image)] if image else [], "messages": messages})
    stats.written = len(out)
    return out, stats


def convert_file(llava_json: str, image_dir: str, output: str, log=print) -> ConvertStats:
    """Read `llava_json`, write `output` atomically, log skips and a summary line.
    Raises DataFileError for an unreadable or malformed input, or when no record is usable
    (nothing is written)."""
    records = load_json(llava_json)
    reported = Counter()

    def report(reason, rid, detail):
        reported[reason] += 1
        if reported[reason] <= MAX_REPORTS_PER_REASON:
            log(f"skip id={rid} ({reason}): {detail}")
        elif reported[reason] == MAX_REPORTS_PER_REASON + 1:
            log(f"further '{reason}' skips are counted, not listed")

    try:
        out, stats = convert_records(records, image_dir, report)
    except DataFileError as e:
        raise DataFileError(f"{llava_json}: {e}") from None
    if not out:  # an empty output would only fail later, at training; nothing is written
        why = f"{stats.summary()}; images were looked up in {os.path.abspath(image_dir)!r}"
        if not os.path.isdir(image_dir):
            why += " (no such folder: check --image-dir)"
        raise DataFileError(f"{llava_json}: no usable record to write ({why})")
    write_json_atomic(output, out)
    log(f"{output}: {stats.summary()}")
    return stats


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Convert LLaVA-Instruct-150K to the MLLM format.")
    ap.add_argument("--llava-json", default="./data/llava_instruct_150k.json")
    ap.add_argument("--image-dir", default="./data/COCO2017/train2017")
    ap.add_argument("--output", default="./data/mllm_format_llava_instruct_data.json")
    args = ap.parse_args(argv)
    try:
        convert_file(args.llava_json, args.image_dir, args.output,
                     log=lambda msg: print(msg, file=sys.stderr))
    except (DataFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
