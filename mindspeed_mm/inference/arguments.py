"""Inference flags and the inference JSON (examples/qwen2vl/inference_qwen2vl_*.json).

The JSON holds the defaults of a launcher (checkpoint, tokenizer folder,
generation settings) under the flags' names in snake_case; a flag given on
the command line wins over the JSON, the JSON over the built-in default:

    {"load": "ckpt/Qwen2-VL-7B-Instruct", "mm_model": null,
     "tokenizer_path": "ckpt/hf_path/Qwen2-VL-7B-Instruct",
     "generation": {"max_new_tokens": 512, "do_sample": false, "temperature": 1.0, "top_k": 0,
                    "top_p": 1.0, "repetition_penalty": 1.0, "stop_token_ids": null}}

``stop_token_ids`` null (the shipped JSONs) takes them from the HF folder, as HF ``generate`` does.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from mindspeed_mm.constants import DTYPES
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import load_json_text
from mindspeed_mm.typed_json import Wording, from_json_value, json_fields

# The inference JSON's wording of key errors ("FILE: unknown key 'generation.max_tokens'").
INFERENCE_JSON = Wording(unknown_key="unknown key '{key}' (known: {known})",
                         wrong_type="{at_parent}'{name}' must be {want}, got {value}")
NOT_IN_JSON = {"json": False}  # field metadata: set by a flag (or by the code), never by the inference JSON


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy unless asked
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    repetition_penalty: float = 1.0  # HF's rule, over the prompt and the generated tokens
    stop_token_ids: Optional[List[int]] = None  # None: generation_config.json's eos_token_id, else the tokenizer's
    seed: int = 1234  # sampling only: the same seed gives the same tokens
    # where each value came from, for messages: key -> "--max-new-tokens" or "FILE: generation.max_new_tokens"
    origin: dict = field(default_factory=dict, repr=False, compare=False, metadata=NOT_IN_JSON)

    def label(self, key: str) -> str:
        """How a message names the setting: the flag (with its value) or the JSON key that set it."""
        where = self.origin.get(key, f"generation.{key}")
        value = getattr(self, key)
        if where.startswith("--"):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            return f"{where} {shown}".rstrip()
        return f"{where} = {value!r}"

    def validate(self) -> None:
        def bad(key, why):
            raise UserError(f"{self.label(key)}: {why}")

        if self.max_new_tokens < 1:
            bad("max_new_tokens", "must be at least 1")
        if self.temperature <= 0:
            bad("temperature", "must be > 0 (use do_sample false for greedy decoding)")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1.0 turns it off)")
        if self.stop_token_ids is not None and not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids")


@dataclass
class InferenceArgs:
    load: Optional[str] = None
    iteration: Optional[int] = None
    mm_model: Optional[str] = None
    tokenizer_path: Optional[str] = None
    tensor_model_parallel_size: int = 1
    device: Optional[str] = None
    params_dtype: Optional[str] = None  # None: the checkpoint's model.json dtype
    min_pixels: Optional[int] = None  # None: the image processor folder's own setting
    max_pixels: Optional[int] = None
    # video clips: data.json's preprocess_parameters keys, the same defaults (mindspeed_mm/data/video.py)
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: Optional[int] = None
    # one conversation
    prompt: Optional[str] = field(default=None, metadata=NOT_IN_JSON)
    image: List[str] = field(default_factory=list, metadata=NOT_IN_JSON)
    video: List[str] = field(default_factory=list, metadata=NOT_IN_JSON)
    system: Optional[str] = None  # None: the chat template's default system turn
    output_json: Optional[str] = field(default=None, metadata=NOT_IN_JSON)
    stream: bool = True
    # a whole file
    input: Optional[str] = field(default=None, metadata=NOT_IN_JSON)
    output: Optional[str] = field(default=None, metadata=NOT_IN_JSON)
    batch_size: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    @property
    def single(self) -> bool:
        return self.input is None

    def video_settings(self):
        from mindspeed_mm.data.video import VideoSettings

        return VideoSettings.from_dict(vars(self))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inference_qwen2vl.py", argument_default=argparse.SUPPRESS,
        description="Chat with a Qwen2-VL checkpoint (one prompt) or run it over an MLLM-format file.")
    p.add_argument("--config", help="inference JSON with defaults for the flags below (flags win)")
    g = p.add_argument_group("model")
    g.add_argument("--load", help="checkpoint directory (converted 'release' or a training save dir)")
    g.add_argument("--iteration", type=int, help="load iter_N instead of the tracker's latest")
    g.add_argument("--mm-model", dest="mm_model", help="model JSON (default: the checkpoint's model.json)")
    g.add_argument("--tokenizer-path", dest="tokenizer_path",
                   help="HF folder with the tokenizer, chat template and image processor")
    g.add_argument("--tensor-model-parallel-size", dest="tensor_model_parallel_size", type=int)
    g.add_argument("--device", choices=("auto", "npu", "cuda", "cpu"))
    g.add_argument("--params-dtype", dest="params_dtype", choices=DTYPES,
                   help="compute dtype (default: the model JSON's dtype)")
    g.add_argument("--min-pixels", dest="min_pixels", type=int, help="image processor min_pixels")
    g.add_argument("--max-pixels", dest="max_pixels", type=int, help="image processor max_pixels")
    g.add_argument("--video-fps", dest="video_fps", type=float, help="video frames sampled per second (2.0)")
    g.add_argument("--video-min-frames", dest="video_min_frames", type=int, help="at least this many frames (4)")
    g.add_argument("--video-max-frames", dest="video_max_frames", type=int, help="at most this many frames (768)")
    g.add_argument("--video-min-pixels", dest="video_min_pixels", type=int, help="pixels per frame at least (128*28*28)")
    g.add_argument("--video-max-pixels", dest="video_max_pixels", type=int, help="pixels per frame at most (768*28*28)")
    g.add_argument("--video-total-pixels", dest="video_total_pixels", type=int,
                   help="pixels of all frames of a clip together at most (default: no such bound)")
    g = p.add_argument_group("one conversation")
    g.add_argument("--prompt", help="the user's text")
    g.add_argument("--image", action="append",
                   help="an image of the user turn (repeatable); each goes where a '<image>' stands in --prompt, "
                        "in order (as in MLLM records: --prompt '<image>\\nQuestion'), or, with no '<image>' in "
                        "--prompt, all before the text with nothing in between")
    g.add_argument("--video", action="append",
                   help="a video clip of the user turn (repeatable); each goes where a '<video>' stands in "
                        "--prompt, in order, or, with no '<video>' in --prompt, all before the text (after the "
                        "images)")
    g.add_argument("--system", help="system turn (default: the chat template's 'You are a helpful assistant.')")
    g.add_argument("--output-json", dest="output_json",
                   help="write {'response', 'token_ids'} of the answer to this file")
    g.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer only when done")
    g = p.add_argument_group("a whole file")
    g.add_argument("--input", help="MLLM-format JSON (as the data converter writes); the last assistant "
                                   "turn, if any, is the reference")
    g.add_argument("--output", help="JSONL with one line per sample")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="prompts decoded together (default 1)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    g.add_argument("--do-sample", dest="do_sample", action=argparse.BooleanOptionalAction,
                   help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", dest="top_k", type=int)
    g.add_argument("--top-p", dest="top_p", type=float)
    g.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    g.add_argument("--stop-token-ids", dest="stop_token_ids", type=int, nargs="*",
                   help="generation stops at any of these ids (default, as HF generate: eos_token_id of "
                        "generation_config.json in --tokenizer-path, else the tokenizer's <|im_end|> and "
                        "<|endoftext|>); none given: no stop id")
    g.add_argument("--seed", type=int)
    return p


def parse_args(argv=None) -> InferenceArgs:
    """Flags over the --config JSON over the built-in defaults, validated once."""
    flags = vars(build_parser().parse_args(argv))
    config_path = flags.pop("config", None)
    data, text = load_json_text(config_path) if config_path else ({}, None)
    args = from_json_value(InferenceArgs, data, INFERENCE_JSON, config_path, text)
    origin = {key: f"{config_path}: generation.{key}" for key in data.get("generation", {})}
    generation_flags = {key: flags.pop(key) for key in json_fields(GenerationSettings) if key in flags}
    origin.update({key: "--" + key.replace("_", "-") for key in generation_flags})
    generation = dataclasses.replace(args.generation, **generation_flags, origin=origin)
    args = dataclasses.replace(args, **flags, generation=generation)
    validate(args, config_path or "flags")
    return args


def validate(args: InferenceArgs, source: str = "flags") -> None:
    if not args.load:
        raise UserError("--load: the checkpoint directory is required")
    if not args.tokenizer_path:
        raise UserError("--tokenizer-path: the HF folder with tokenizer and image processor is required")
    if (args.prompt is None) == (args.input is None):
        raise UserError("give either --prompt (one conversation) or --input FILE (a whole file)")
    if args.input is not None:
        if not args.output:
            raise UserError("--input needs --output FILE.jsonl")
        if args.image or args.video or args.output_json:
            raise UserError("--image, --video and --output-json belong to a single --prompt, not to --input")
    elif args.output:
        raise UserError("--output belongs to --input; for one prompt use --output-json")
    if args.tensor_model_parallel_size < 1:
        raise UserError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.params_dtype is not None and args.params_dtype not in DTYPES:
        raise UserError(f"{source}: params_dtype must be one of {', '.join(DTYPES)}")
    for path, flag in ((args.load, "--load"), (args.tokenizer_path, "--tokenizer-path")):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: directory not found")
    try:
        args.video_settings()
    except ValueError as e:  # "video_fps must be > 0, got 0": the message starts with the key
        key = str(e).split()[0]
        raise UserError(f"{source}: --{key.replace('_', '-')} / {key}{str(e)[len(key):]}") from None
    args.generation.validate()
