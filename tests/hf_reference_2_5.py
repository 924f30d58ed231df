"""The Hugging Face Qwen2.5-VL reference the Qwen2.5-VL model and conversion tests compare against.

A tiny random ``Qwen2_5_VLForConditionalGeneration`` chosen so that symmetric mistakes cannot pass:

* the LLM is tests/hf_reference.py's (3 layers, 4 query heads over 2 KV heads, M-RoPE sections [2, 3, 3],
  vocabulary 2100 that megatron pads);
* the ViT is 32 wide (out_hidden_size 64, the LLM's), 4 blocks with full attention in block 1 only (not at
  an end), a gated MLP of 48, and windows of 56 px = 2 x 2 merged tokens: a 6 x 10-patch image (3 x 5
  merged tokens) gets windows of 4, 4, 2 / 2, 2, 1 merged tokens;
* videos use absolute time: tokens_per_second 2 and second_per_grid_ts that are not integers (0.7 s gives
  temporal steps of 1.4, truncated as HF truncates them);
* every parameter perturbed away from its init (no trivial 0/1 norm or bias).

Batches come from tests/hf_reference.make_mm_batch (same token ids, patch rows of 1176 values, HF's
``mm_token_type_ids``: text 0, image 1, video 2).
"""
import torch

from tests.hf_reference import PAD_ID, TOKENS, VOCAB

VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, window_size=56,
              fullatt_block_indexes=[1], tokens_per_second=2)
# (t, h, w) in patches: partial windows both ways; one exact window (HF pads an empty one); portrait
IMAGE_GRIDS = ((1, 6, 10), (1, 4, 4), (1, 8, 4))
VIDEO_GRID = (3, 4, 6)  # 3 temporal patches of 2 x 3 merged tokens: windows of 4 and 2 per frame
SECONDS = {"video": 0.7}  # seconds per temporal patch (HF processor: temporal_patch_size / fps)


def hf_config(tie_word_embeddings: bool = False, **vision_overrides):
    """transformers Qwen2_5_VLConfig (tiny), eager attention everywhere."""
    from scripts.make_tiny_qwen2vl import tiny_config

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=PAD_ID, tie_word_embeddings=tie_word_embeddings)
    config = tiny_config(vision_config={**VISION, **vision_overrides}, family="qwen2_5_vl", **TOKENS, **text)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def hf_model(config=None, seed: int = 0, dtype=torch.float32):
    """A random HF model in eval mode; every parameter perturbed away from its init."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config or hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def our_config(config=None, dtype: str = "fp32"):
    from mindspeed_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig.from_hf((config or hf_config()).to_dict())
    cfg.dtype = dtype
    return cfg


def build_our_model(hf, cfg=None, pre_process: bool = True, post_process: bool = True, **parallel_kwargs):
    """This rank's stage of our Qwen2_5_VLModel holding ``hf``'s weights, loaded as checkpoints are (the
    spec's hf_to_mm, then shard_state).  Call after init_distributed."""
    from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL
    from tests.hf_reference import hf_state

    cfg = cfg or our_config(hf.config)
    model = QWEN2_5_VL.model_cls(cfg, pre_process=pre_process, post_process=post_process, **parallel_kwargs)
    model.load_full_state(QWEN2_5_VL.hf_to_mm(hf_state(hf), cfg))
    return model


def make_batch(layouts, padding_side: str = "right", seed: int = 0):
    """tests/hf_reference.make_mm_batch plus ``second_per_grid_ts`` [n_videos] (float32, as HF's processor
    returns it; None without videos)."""
    from tests.hf_reference import make_mm_batch

    batch = make_mm_batch(layouts, padding_side, seed)
    n_videos = 0 if batch["video_grid_thw"] is None else len(batch["video_grid_thw"])
    batch["second_per_grid_ts"] = (torch.tensor([SECONDS["video"] + 0.5 * i for i in range(n_videos)])
                                   if n_videos else None)
    return batch


def hf_forward(model, batch, with_labels: bool = True):
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    kwargs = {k: batch[k] for k in keys if batch.get(k) is not None}
    if with_labels:
        kwargs["labels"] = batch["labels"]
    return model(**kwargs, use_cache=False)


def hf_vision_features(model, batch) -> torch.Tensor:
    """HF's merged ViT features, images then videos (each [n / merge**2, 64], the processor's order)."""
    out = []
    for pixels, grid, get in (("pixel_values", "image_grid_thw", model.model.get_image_features),
                              ("pixel_values_videos", "video_grid_thw", model.model.get_video_features)):
        if batch.get(pixels) is not None:
            out.append(torch.cat(get(batch[pixels], batch[grid]).pooler_output))
    return torch.cat(out)


def our_forward(model, batch, position_ids=None, labels=None, **kwargs):
    """Our model on a batch (the keyword arguments training and inference use, second_per_grid_ts included)."""
    return model(batch["input_ids"], position_ids, batch["attention_mask"], batch["pixel_values"],
                 batch["image_grid_thw"], labels=labels, pixel_values_videos=batch["pixel_values_videos"],
                 video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"], **kwargs)


def our_vision_features(model, batch) -> torch.Tensor:
    images, videos = model.vision_features(batch["pixel_values"], batch["image_grid_thw"],
                                           batch["pixel_values_videos"], batch["video_grid_thw"])
    return torch.cat([f for f in (images, videos) if f is not None])
