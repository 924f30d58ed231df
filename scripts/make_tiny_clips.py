"""Write tiny synthetic video clips with PyAV, offline.

    python scripts/make_tiny_clips.py OUT_DIR --count 16

Writes ``OUT_DIR/clips/<i>.mp4`` (MPEG-4 part 2, yuv420p) and
``OUT_DIR/tiny_videos.json`` in the MLLM format (``messages`` with a ``<video>``
placeholder, ``videos`` paths relative to OUT_DIR).  Every clip shows one
coloured square crossing a plain background left, right, up or down; the
answer is that direction, so a model must compare frames to get it right.
Frame k is ``clip_frames(...)[k]`` exactly before encoding, so tests can
check which frames a decoder returned.
"""
import argparse
import os
import random
from fractions import Fraction

import numpy as np

from mindspeed_mm.jsonio import write_json_atomic

DIRECTIONS = ("left", "right", "up", "down")
COLOURS = ((220, 30, 30), (30, 170, 60), (40, 70, 220), (235, 200, 20))
BACKGROUNDS = ((245, 245, 240), (40, 40, 40), (200, 220, 240))
SIZES = ((64, 48), (96, 64), (112, 84), (84, 112))
QUESTIONS = (
    "Which way does the square move?",
    "In which direction is the square moving?",
    "Where does the square go: left, right, up or down?",
)


def clip_frames(direction: str, width: int = 96, height: int = 64, frames: int = 16,
                seed: int = 0) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the square moves evenly from one edge to the other."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    rng = random.Random(seed)
    colour, background = rng.choice(COLOURS), rng.choice(BACKGROUNDS)
    side = max(4, min(width, height) // 4)
    across = rng.randint(0, min(width, height) - side)  # position on the other axis
    horizontal = direction in ("left", "right")
    travel = (width if horizontal else height) - side
    out = np.empty((frames, height, width, 3), np.uint8)
    out[:] = background
    for k in range(frames):
        along = round(travel * k / max(frames - 1, 1))
        if direction in ("left", "up"):
            along = travel - along
        x, y = (along, across) if horizontal else (across, along)
        out[k, y:y + side, x:x + side] = colour
    return out


def make_clip(path: str, direction: str, width: int = 96, height: int = 64, frames: int = 16,
              fps: float = 8.0, seed: int = 0, codec: str = "mpeg4") -> str:
    """Encode clip_frames(direction, width, height, frames, seed) at ``fps``; return ``path``."""
    import av

    if width % 2 or height % 2 or width < 8 or height < 8:
        raise ValueError(f"width and height must be even and >= 8 (yuv420p), got {width}x{height}")
    if frames < 1 or fps <= 0:
        raise ValueError(f"frames must be >= 1 and fps > 0, got {frames} frames at {fps} fps")
    pixels = clip_frames(direction, width, height, frames, seed)
    # MPEG-4 limits the time base denominator to 65535.
    rate = Fraction(str(fps)).limit_denominator(65535)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless at these sizes: frames stay identifiable
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels[k], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_tiny_clips(out_dir: str, count: int = 16, seed: int = 0) -> str:
    """Write ``count`` clips and the MLLM-format JSON; return the JSON's path."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    records = []
    for i in range(count):
        direction = DIRECTIONS[i % len(DIRECTIONS)]
        width, height = rng.choice(SIZES)
        rel = f"clips/{i}.mp4"
        make_clip(os.path.join(out_dir, rel), direction, width, height, frames=rng.randint(8, 24),
                  fps=rng.choice((4.0, 8.0, 10.0, 12.0)), seed=rng.randrange(1 << 30))
        records.append({
            "messages": [
                {"role": "user", "content": f"<video>{QUESTIONS[i % len(QUESTIONS)]}"},
                {"role": "assistant", "content": direction},
            ],
            "videos": [rel],
        })
    path = os.path.join(out_dir, "tiny_videos.json")
    write_json_atomic(path, records, indent=1)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_clips(args.out_dir, args.count, args.seed)
    print(f"wrote {args.count} clips to {os.path.join(args.out_dir, 'clips')} and {path}")


if __name__ == "__main__":
    main()
