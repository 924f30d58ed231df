"""Write a tiny random Qwen2-VL (or Qwen2.5-VL) in Hugging Face format, fully offline.

    python scripts/make_tiny_qwen2vl.py --save-dir ./ckpt/tiny-qwen2vl
    python scripts/make_tiny_qwen2vl.py --save-dir ./ckpt/tiny-qwen2.5vl --family qwen2_5_vl

The folder loads with `Qwen2VLForConditionalGeneration.from_pretrained` (with `--family qwen2_5_vl`:
`Qwen2_5_VLForConditionalGeneration.from_pretrained`), `AutoTokenizer.from_pretrained` and
`Qwen2VLImageProcessor.from_pretrained` (Qwen2.5-VL uses the same image processor class, tokenizer and
chat template). Sizes are small, but everything that shapes the data path is kept as in Qwen2-VL: patch
14, merge 2, temporal patch 2, the special tokens and the real chat template; a Qwen2.5-VL also keeps
window attention that splits images (window 56 px = 2x2 merged tokens, full attention in the second of
its 3 ViT blocks only) and tokens_per_second 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

# Qwen2-VL's chat template (tokenizer_config.json of Qwen2-VL-*-Instruct).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# In Qwen2's order, so ids keep the real relative layout (image_pad = endoftext + 12).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, spaces).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 2048

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

_ENGLISH = """
A small kitchen with a wooden table by the window. Two mugs and a plate of bread sit on
the table, and a kettle is on the stove behind them. The umbrella is bright yellow with a
thin black handle. The pavement looks wet and the person is holding the umbrella open, so
it is probably raining or has just stopped. What colour is the car in the picture? Describe
the scene in detail. A man is riding a bicycle down a busy street next to a red bus. There
are several people waiting at the bus stop, and a dog is sitting near the bench. The sky is
cloudy and the trees have lost most of their leaves, which suggests it is autumn. How many
animals can you see in the image? There are three horses standing in a green field behind a
white fence. A plate of food with rice, vegetables and a piece of grilled fish is on the
table. The cat is sleeping on the sofa next to a blue pillow. Why might the people be
gathered here? They are probably watching a game, since many of them are wearing the same
jerseys and looking towards the field. A train is stopped at the station while passengers
get on and off. The room has a large bed, a lamp on the night stand and a painting on the
wall. What is the woman holding in her hand? She is holding a phone and appears to be
taking a photo of the building. The giraffe is eating leaves from the top of a tall tree.
"""


def _training_text() -> list[str]:
    """English text available offline: the paragraph above plus stdlib docstrings."""
    import argparse as a, collections as c, json as j, os as o, pathlib as p, string as s

    docs = [inspect.getdoc(m) or "" for m in (a, c, j, o, p, s)]
    docs += [inspect.getdoc(f) or "" for f in (sorted, open, print, zip, enumerate, range)]
    return [_ENGLISH] * 4 + docs


def make_tokenizer(save_dir: str | None = None):
    """Byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template.

    Returns a `PreTrainedTokenizerFast`; saves it to `save_dir` when given.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    # Added to the raw tokenizer first so their ids follow the BPE vocab in Qwen2's order.
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    if save_dir:
        hf_tok.save_pretrained(save_dir)
    return hf_tok


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def tiny_config(vision_config: dict | None = None, family: str = "qwen2_vl", **overrides):
    """A small `Qwen2VLConfig` (``family="qwen2_5_vl"``: a `Qwen2_5_VLConfig`). `overrides` update the
    text config (or the top-level token ids); `vision_config` entries update the vision config."""
    if family == "qwen2_5_vl":
        return _tiny_config_2_5(vision_config, **overrides)
    if family != "qwen2_vl":
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    from transformers import Qwen2VLConfig

    text, top = _tiny_text_config(overrides)
    vision = dict(
        depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=4,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
    )
    vision.update(vision_config or {})
    vision["hidden_size"] = text["hidden_size"]
    return Qwen2VLConfig(text_config=text, vision_config=vision,
                         tie_word_embeddings=text["tie_word_embeddings"], **top)


def _tiny_text_config(overrides: dict) -> tuple[dict, dict]:
    """(text config, top-level token ids) of the tiny models; ``overrides`` update them."""
    text = dict(
        vocab_size=BPE_VOCAB_SIZE + 128, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        # head_dim 32 -> 16 rotary pairs, split non-uniformly like the real [16, 24, 24].
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    top_keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    top = {k: overrides.pop(k) for k in top_keys if k in overrides}
    text.update(overrides)
    return text, top


def _tiny_config_2_5(vision_config: dict | None = None, **overrides):
    """A small `Qwen2_5_VLConfig`: the text part as Qwen2-VL's tiny one; the ViT 64 wide (its own width,
    ``out_hidden_size`` the LLM's), a gated MLP, windows of 2x2 merged tokens, full attention in block 1."""
    from transformers import Qwen2_5_VLConfig

    text, top = _tiny_text_config(overrides)
    vision = dict(
        depth=3, hidden_size=64, intermediate_size=96, num_heads=4, hidden_act="silu",
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
    )
    vision.update(vision_config or {})
    vision["out_hidden_size"] = text["hidden_size"]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=text["tie_word_embeddings"], **top)


def make_image_processor(save_dir: str | None = None, min_pixels: int = 56 * 56,
                         max_pixels: int = 224 * 224):
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    if save_dir:
        proc.save_pretrained(save_dir)
    return proc


def make_tiny_qwen2vl(save_dir: str, seed: int = 0, min_pixels: int = 56 * 56,
                      max_pixels: int = 224 * 224, with_model: bool = True, head_scale: float = 1.0,
                      family: str = "qwen2_vl", **config_overrides):
    """Write tokenizer, image processor and (unless `with_model=False`) a random model
    to `save_dir`. Returns the `Qwen2VLConfig` written (``family="qwen2_5_vl"``: a Qwen2.5-VL,
    the `Qwen2_5_VLConfig`; its tokenizer, chat template and image processor are the same).

    ``head_scale`` multiplies the output layer: a random head (std 0.02) over a normalised hidden
    state gives logits within about +-2.6, so no token can reach a probability that would bring the
    loss below ~5.0 unless the head or the final norm is trained (LoRA trains neither); a pretrained
    model's head is that sharp already."""
    import torch

    os.makedirs(save_dir, exist_ok=True)
    tokenizer = make_tokenizer(save_dir)
    make_image_processor(save_dir, min_pixels, max_pixels)
    ids = special_token_ids(tokenizer)
    vocab = -(-len(tokenizer) // 128) * 128  # round up like Qwen's padded vocab
    overrides = dict(vocab_size=vocab, bos_token_id=ids["bos_token_id"],
                     eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    overrides.update({k: ids[k] for k in ("image_token_id", "video_token_id",
                                          "vision_start_token_id", "vision_end_token_id")})
    overrides.update(config_overrides)
    config = tiny_config(family=family, **overrides)
    if with_model:
        import transformers

        torch.manual_seed(seed)
        model_cls = (transformers.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
                     else transformers.Qwen2VLForConditionalGeneration)
        model = model_cls(config)
        if head_scale != 1.0:
            with torch.no_grad():
                model.lm_head.weight.mul_(head_scale)
        model.save_pretrained(save_dir)
    else:
        config.save_pretrained(save_dir)
    # Token ids at the top level too, where Qwen2-VL's own config.json has them.
    path = os.path.join(save_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.setdefault(key, ids[key])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=224 * 224)
    ap.add_argument("--head-scale", type=float, default=1.0,
                    help="multiply the output layer (a sharper head, as a pretrained model has: for LoRA demos)")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_vl",
                    help="the model family: qwen2_vl (default) or qwen2_5_vl")
    args = ap.parse_args(argv)
    try:
        make_tiny_qwen2vl(args.save_dir, seed=args.seed, min_pixels=args.min_pixels,
                          max_pixels=args.max_pixels, head_scale=args.head_scale, family=args.family)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = "Qwen2.5-VL" if args.family == "qwen2_5_vl" else "Qwen2-VL"
    print(f"wrote tiny {name} to {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
