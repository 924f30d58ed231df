"""data.json: the guide's keys as typed, validated dataclasses.

Every user mistake (unknown key, wrong type, bad value) raises `DataConfigError` whose
message is one line naming the key path, e.g. `dataset_param.basic_parameters.cutoff_len`.
"""

from __future__ import annotations

import math
import os
import typing
from typing import Any, ClassVar, Mapping
from dataclasses import dataclass, field

from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import DataFileError, load_json_text
from mindspeed_mm.typed_json import Wording, from_json_value, position_text


class DataConfigError(UserError, ValueError):
    """A mistake in data.json; str() is a one-line message naming the key (``key``, dotted, when known)."""

    def __init__(self, message: str, key: typing.Optional[str] = None):
        super().__init__(message)
        self.key = key


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class VideoSettings:
    """How video clips are sampled and sized (mindspeed_mm/data/video.py); data.json / inference JSON keys
    in ``KEYS``."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int | None = None  # qwen-vl-utils' total budget; None = no budget

    KEYS: ClassVar[dict[str, str]] = {
        "video_fps": "fps", "video_min_frames": "min_frames", "video_max_frames": "max_frames",
        "video_min_pixels": "min_pixels", "video_max_pixels": "max_pixels",
        "video_total_pixels": "total_pixels",
    }

    def __post_init__(self):
        if not _is_number(self.fps) or self.fps <= 0:
            raise ValueError(f"video_fps must be > 0, got {self.fps!r}")
        for key, low in (("video_min_frames", 1), ("video_min_pixels", 1)):
            value = getattr(self, self.KEYS[key])
            if not _is_int(value) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        for key, low_key in (("video_max_frames", "video_min_frames"), ("video_max_pixels", "video_min_pixels")):
            value, low = getattr(self, self.KEYS[key]), getattr(self, self.KEYS[low_key])
            if not _is_int(value) or value < low:
                raise ValueError(f"{key} must be an integer >= {low_key} ({low}), got {value!r}")
        if self.total_pixels is not None and (not _is_int(self.total_pixels) or self.total_pixels < 1):
            raise ValueError(f"video_total_pixels must be an integer >= 1 or null, got {self.total_pixels!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VideoSettings":
        """Read the ``video_*`` keys of ``KEYS`` (absent or null = default); other keys are ignored."""
        return cls(**{field: d[key] for key, field in cls.KEYS.items() if d.get(key) is not None})


@dataclass
class PreprocessParameters:
    model_name_or_path: str
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # Video clips (data/video.py: frames sampled at video_fps within min/max frames, each frame resized
    # within video_min/max_pixels; video_total_pixels, when set, caps all frames of a clip together).
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: typing.Optional[int] = None

    def video_settings(self) -> "VideoSettings":
        return VideoSettings.from_dict(vars(self))


@dataclass
class BasicParameters:
    dataset: str
    cache_dir: str
    template: str = "qwen2vl"
    dataset_dir: str = "."
    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    overwrite_cache: bool = False
    preprocessing_num_workers: int = 1
    max_samples: typing.Optional[int] = None

    def dataset_files(self) -> list[str]:
        """The comma-separated `dataset` entries; relative ones resolved by the caller."""
        return [p.strip() for p in self.dataset.split(",") if p.strip()]

    def resolved_dataset_files(self) -> list[str]:
        """`dataset` entries as given if they exist (the guide writes './data/x.json'), else
        under `dataset_dir`; DataFileError naming the entry when one is in neither place."""
        files = []
        for name in self.dataset_files():
            path = name if os.path.isabs(name) or os.path.isfile(name) else os.path.join(self.dataset_dir, name)
            if not os.path.isfile(path):
                raise DataFileError(f"dataset_param.basic_parameters.dataset: file {name!r} not found "
                                      f"(also looked in dataset_dir {self.dataset_dir!r})")
            files.append(path)
        return files


@dataclass
class Attr:
    images: str = "images"
    videos: str = "videos"
    messages: str = "messages"
    role_tag: str = "role"
    content_tag: str = "content"
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    system_tag: typing.Optional[str] = "system"


@dataclass
class CollateParam:
    model_name: str = "qwen2vl"
    ignore_pad_token_for_loss: bool = True
    pad_to_multiple_of: int = 1


@dataclass
class DataloaderParam:
    batch_size: int = 1
    num_workers: int = 2
    shuffle: bool = True
    drop_last: bool = True
    pin_memory: bool = True
    collate_param: CollateParam = field(default_factory=CollateParam)


@dataclass
class DatasetParam:
    preprocess_parameters: PreprocessParameters
    basic_parameters: BasicParameters
    dataset_type: str = "huggingface"
    attr: Attr = field(default_factory=Attr)


@dataclass
class PackingParam:
    """Sequence packing (off without this key): samples share rows of at most ``max_tokens`` LLM tokens,
    formed first-fit-decreasing within shuffle windows of ``window`` samples (mindspeed_mm/data/packing.py)."""
    max_tokens: int
    window: int = 1000


@dataclass
class DataConfig:
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = field(default_factory=DataloaderParam)
    packing: typing.Optional[PackingParam] = None

    def validate(self) -> "DataConfig":
        def bad(key, msg):
            raise DataConfigError(f"{key}: {msg}", key)

        dp, bp = self.dataset_param, self.dataset_param.basic_parameters
        pp, dl = dp.preprocess_parameters, self.dataloader_param
        if dp.dataset_type != "huggingface":
            bad("dataset_param.dataset_type", f"only 'huggingface' is supported, got {dp.dataset_type!r}")
        if bp.template != "qwen2vl":
            bad("dataset_param.basic_parameters.template", f"only 'qwen2vl' is supported, got {bp.template!r}")
        if not bp.dataset_files():
            bad("dataset_param.basic_parameters.dataset", "names no file")
        for key, value, low in (
            ("basic_parameters.cutoff_len", bp.cutoff_len, 1),
            ("basic_parameters.preprocessing_num_workers", bp.preprocessing_num_workers, 1),
            ("basic_parameters.max_samples", bp.max_samples, 1),
            ("preprocess_parameters.min_pixels", pp.min_pixels, 1),
            ("preprocess_parameters.max_pixels", pp.max_pixels, 1),
        ):
            if value is not None and value < low:
                bad(f"dataset_param.{key}", f"must be >= {low}, got {value}")
        if pp.min_pixels > pp.max_pixels:
            bad("dataset_param.preprocess_parameters.min_pixels", "must not exceed max_pixels")
        try:
            pp.video_settings()
        except ValueError as e:  # "video_fps must be > 0, got 0": the message starts with the key
            key = str(e).split()[0]
            bad(f"dataset_param.preprocess_parameters.{key}", str(e)[len(key):].strip())
        for key, value, low in (("batch_size", dl.batch_size, 1), ("num_workers", dl.num_workers, 0),
                                ("collate_param.pad_to_multiple_of", dl.collate_param.pad_to_multiple_of, 1)):
            if value < low:
                bad(f"dataloader_param.{key}", f"must be >= {low}, got {value}")
        if dl.collate_param.model_name != "qwen2vl":
            bad("dataloader_param.collate_param.model_name", "only 'qwen2vl' is supported")
        if self.packing is not None:
            for key, value, low in (("packing.max_tokens", self.packing.max_tokens, 2),
                                    ("packing.window", self.packing.window, 1)):
                if value < low:
                    bad(key, f"must be >= {low}, got {value}")
        return self


# data.json's wording of key errors: the canonical "KEY: what is wrong".
DATA_JSON = Wording(error=DataConfigError)


def data_config_from_dict(data: dict, source: str = None, text: str = None) -> DataConfig:
    """data.json (parsed) as a validated DataConfig; errors name ``source`` (the file) when given, and
    the line and column of the key when ``text`` (the file's JSON) is given too."""
    config = from_json_value(DataConfig, data, DATA_JSON, source, text)
    try:
        return config.validate()
    except DataConfigError as e:
        where = position_text(text, tuple(e.key.split("."))) if e.key else ""
        raise DataConfigError(f"{source}: {e}{where}" if source else str(e), e.key) from None


# A HF model folder needs one of these for the tokenizer, and the image processor's config.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


MODEL_KEY = "dataset_param.preprocess_parameters.model_name_or_path"


def check_model_dir(model: str, key: str = MODEL_KEY) -> None:
    """DataConfigError unless `model` is a local folder with a tokenizer and an image processor;
    messages start with `key`, the data.json key or flag that names the folder."""
    if not os.path.isdir(model):
        raise DataConfigError(f"{key}: folder {model!r} not found (download the HF model there first, "
                              f"e.g. hf download Qwen/Qwen2-VL-7B-Instruct --local-dir {model})")
    if not any(os.path.isfile(os.path.join(model, n)) for n in _TOKENIZER_FILES):
        raise DataConfigError(f"{key}: {model!r} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    if not os.path.isfile(os.path.join(model, _IMAGE_PROCESSOR_FILE)):
        raise DataConfigError(f"{key}: {model!r} has no image processor ({_IMAGE_PROCESSOR_FILE})")


def check_paths(config: DataConfig) -> list[str]:
    """The files and folders data.json names exist; returns the resolved dataset files."""
    bp = config.dataset_param.basic_parameters
    if not os.path.isdir(bp.dataset_dir):
        raise DataConfigError(f"dataset_param.basic_parameters.dataset_dir: folder {bp.dataset_dir!r} not found")
    files = bp.resolved_dataset_files()
    check_model_dir(config.dataset_param.preprocess_parameters.model_name_or_path)
    return files


def validate_data_json(path: str) -> DataConfig:
    """Everything about data.json that can be checked cheaply, without torch, the tokenizer or
    the cache: keys, types, values, the dataset files, dataset_dir and the model folder.
    Raises DataConfigError (a UserError) with one line naming the file and the key."""
    config = load_data_config(path)
    try:
        check_paths(config)
    except (DataConfigError, DataFileError) as e:
        raise type(e)(f"{path}: {e}") from None
    return config


def load_data_config(path: str) -> DataConfig:
    """Read and validate data.json; errors name the file and the key."""
    data, text = load_json_text(path)
    return data_config_from_dict(data, path, text)
