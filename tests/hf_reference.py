"""The Hugging Face reference that model, training and inference tests compare against.

A tiny random ``Qwen2VLForConditionalGeneration`` whose shape can catch wrong
splits: M-RoPE sections [2, 3, 3] (not uniform), 4 query heads over 2 KV
heads, 3 LLM layers (uneven pipeline splits), a vocabulary (2100) that
megatron pads (to 2176 at TP=1, 2304 at TP=2), and every parameter
perturbed so no bias or norm is a trivial 0/1.  Token ids are those of
``scripts/make_tiny_qwen2vl.py``'s tokenizer.

The batch has two samples: sample 0 holds two images of different sizes and
aspect ratios between text, sample 1 is text only and shorter, padded on
``padding_side``.  Labels are HF's (unshifted, -100 on prompt and padding).
"""
import torch

TOKENS = dict(image_token_id=2060, video_token_id=2061, vision_start_token_id=2057, vision_end_token_id=2058)
PAD_ID = 2048  # <|endoftext|>
VOCAB = 2100
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch
IMAGE_GRIDS = ((1, 4, 6), (1, 8, 4))  # (t, h, w) in patches: 6 and 8 merged tokens, landscape and portrait


def hf_config(**text_overrides):
    """transformers Qwen2VLConfig (tiny); ``text_overrides`` update the text config."""
    from scripts.make_tiny_qwen2vl import tiny_config

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=PAD_ID)
    text.update(text_overrides)
    vision = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2)
    config = tiny_config(vision_config=vision, **TOKENS, **text)
    config._attn_implementation = "eager"  # the plainest math: no kernel choice in the reference
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return config


def hf_model(config=None, seed: int = 0, dtype=torch.float32):
    """A random HF model in eval mode; every parameter perturbed away from its init."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config or hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def our_config(config=None, dtype: str = "fp32"):
    """Our Qwen2VLConfig for the same architecture."""
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_hf((config or hf_config()).to_dict())
    cfg.dtype = dtype
    return cfg


def hf_state(model):
    """The model's state dict (transformers-5 internal names, accepted by the mapping table)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tokens(n, seed):
    return torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _image(grid):
    t, h, w = grid
    return ([TOKENS["vision_start_token_id"]] + [TOKENS["image_token_id"]] * (t * h * w // 4)
            + [TOKENS["vision_end_token_id"]])


def _padded(samples, padding_side: str, pad_to_multiple: int):
    """(input_ids, labels, attention_mask) [b, s] of (prompt, answer) token lists, padded on one side to the
    longest (a multiple of ``pad_to_multiple``); labels are the answers."""
    seq = max(len(p) + len(a) for p, a in samples)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(samples), seq), PAD_ID)
    labels = torch.full((len(samples), seq), -100)
    attention_mask = torch.zeros(len(samples), seq, dtype=torch.long)
    for b, (prompt, answer) in enumerate(samples):
        n = len(prompt) + len(answer)
        start = 0 if padding_side == "right" else seq - n
        input_ids[b, start:start + n] = torch.tensor(prompt + answer)
        labels[b, start + len(prompt):start + n] = torch.tensor(answer)
        attention_mask[b, start:start + n] = 1
    return input_ids, labels, attention_mask


def make_batch(padding_side: str = "right", seed: int = 0, pad_to_multiple: int = 1):
    """dict: input_ids / attention_mask / labels / mm_token_type_ids [2, s], pixel_values [n_patches, 1176],
    image_grid_thw [2, 3]. Labels supervise the 'answer' tail of each sample; s is 31 rounded up to
    ``pad_to_multiple`` (sequence parallelism needs a multiple of TP)."""
    prompt0 = _tokens(4, seed) + _image(IMAGE_GRIDS[0]) + _tokens(3, seed + 1) + _image(IMAGE_GRIDS[1])
    answer0 = _tokens(6, seed + 2)
    prompt1, answer1 = _tokens(5, seed + 3), _tokens(4, seed + 4)
    samples = [(prompt0, answer0), (prompt1, answer1)]
    input_ids, labels, attention_mask = _padded(samples, padding_side, pad_to_multiple)
    n_patches = sum(t * h * w for t, h, w in IMAGE_GRIDS)
    pixel_values = torch.randn(n_patches, PATCH_DIM, generator=torch.Generator().manual_seed(seed + 5))
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                mm_token_type_ids=(input_ids == TOKENS["image_token_id"]).int(),
                pixel_values=pixel_values, image_grid_thw=torch.tensor(IMAGE_GRIDS))


def hf_forward(model, batch, with_labels: bool = True):
    """HF output (logits [b, s, vocab], loss = mean over supervised tokens when labelled)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    kwargs = {k: batch[k] for k in keys}
    if with_labels:
        kwargs["labels"] = batch["labels"]
    return model(**kwargs, use_cache=False)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted HF labels [b, s] -> ours (labels[:, t] is the target predicted at t; -100 at the end)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


def build_our_model(hf, cfg=None, pre_process: bool = True, post_process: bool = True, **parallel_kwargs):
    """This rank's stage of our Qwen2VLModel holding ``hf``'s weights, loaded the way checkpoints are:
    QWEN2VL.hf_to_mm, then the spec's shard_state. Call after init_distributed."""
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel

    cfg = cfg or our_config(hf.config)
    model = Qwen2VLModel(cfg, pre_process=pre_process, post_process=post_process, **parallel_kwargs)
    model.load_full_state(QWEN2VL.hf_to_mm(hf_state(hf), cfg))
    return model


def hub_flat_config(hf_nested: dict) -> dict:
    """The hub's original config.json layout: LLM keys at the top, vision_config nested."""
    flat = {k: v for k, v in hf_nested.items() if k != "text_config"}
    text = dict(hf_nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["model_type"] = "qwen2_vl"
    return flat


# ---- videos (and images with videos) ------------------------------------------------------------
VIDEO_GRIDS = ((2, 4, 6), (3, 2, 4))  # (t, h, w) in patches, t temporal patches of 2 frames: 12 and 6 tokens
MM_TOKEN_TYPE = {"image": 1, "video": 2}  # transformers 5's mm_token_type_ids: text 0, image 1, video 2


def _vision_item(kind: str, grid):
    t, h, w = grid
    return ([TOKENS["vision_start_token_id"]] + [TOKENS[f"{kind}_token_id"]] * (t * h * w // 4)
            + [TOKENS["vision_end_token_id"]])


def make_mm_batch(layouts, padding_side: str = "right", seed: int = 0, pad_to_multiple: int = 1):
    """A batch of images and videos as HF's processors give it.

    ``layouts``: per sample, its vision items in text order, e.g. ``[[("image", (1, 4, 6)), ("video", (2, 4, 6))],
    [("video", (3, 2, 4))]]`` (t*h*w patches each; t*h*w/4 ``<|image_pad|>`` / ``<|video_pad|>`` tokens between
    ``<|vision_start|>`` and ``<|vision_end|>``), text before, between and after them, then a supervised answer;
    samples padded with PAD_ID on ``padding_side``.

    dict: input_ids / attention_mask / labels / mm_token_type_ids [b, s]; pixel_values [n_image_patches, 1176]
    and image_grid_thw [n_img, 3] (None without images); pixel_values_videos [n_video_patches, 1176] and
    video_grid_thw [n_vid, 3] (None without videos), each in token order."""
    samples, grids = [], {"image": [], "video": []}
    for b, items in enumerate(layouts):
        prompt = _tokens(3, seed + 10 * b)
        for i, (kind, grid) in enumerate(items):
            prompt += _vision_item(kind, grid) + _tokens(2, seed + 10 * b + i + 1)
            grids[kind].append(tuple(grid))
        samples.append((prompt, _tokens(5, seed + 10 * b + 9)))
    input_ids, labels, attention_mask = _padded(samples, padding_side, pad_to_multiple)
    mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    for k, (kind, pixels_key) in enumerate((("image", "pixel_values"), ("video", "pixel_values_videos"))):
        mm_token_type_ids[input_ids == TOKENS[f"{kind}_token_id"]] = MM_TOKEN_TYPE[kind]
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            gen = torch.Generator().manual_seed(seed + 5 + k)
            batch[pixels_key] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=gen)
            batch[f"{kind}_grid_thw"] = grid
        else:
            batch[pixels_key] = batch[f"{kind}_grid_thw"] = None
    batch["mm_token_type_ids"] = mm_token_type_ids
    return batch


def hf_forward_mm(model, batch, with_labels: bool = True):
    """hf_forward for a make_mm_batch batch: images and videos (absent ones not passed)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw")
    kwargs = {k: batch[k] for k in keys if batch[k] is not None}
    if with_labels:
        kwargs["labels"] = batch["labels"]
    return model(**kwargs, use_cache=False)


def our_forward_mm(model, batch, position_ids=None, labels=None, **kwargs):
    """Our Qwen2VLModel on a make_mm_batch batch (keyword arguments, videos included)."""
    return model(batch["input_ids"], position_ids, batch["attention_mask"], batch["pixel_values"],
                 batch["image_grid_thw"], labels=labels, pixel_values_videos=batch["pixel_values_videos"],
                 video_grid_thw=batch["video_grid_thw"], **kwargs)
