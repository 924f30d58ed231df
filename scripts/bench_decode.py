"""Decoding speed: our KV-cached generator next to Hugging Face's ``generate``, same model, same prompt.

    python scripts/bench_decode.py --new-tokens 64 --batch-size 1
    python scripts/bench_decode.py --device cuda --dtype bf16 --hidden-size 1024 --num-layers 8

Builds a random Qwen2-VL (scripts/make_tiny_qwen2vl.py's tiny config unless
sizes are given), loads the same weights into ours through the project's
mapping, builds one chat prompt with an image (``--no-image`` for text only)
and times greedy generation of ``--new-tokens`` tokens with both.  Decode
speed is measured the same way for both: (time for N tokens - time for 1
token) over the N-1 later tokens (x batch), best of ``--repeats`` runs after
a warm-up.  It also checks that both produce the same tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindspeed_mm.constants import DTYPES, torch_dtype  # noqa: E402  (after the path setup)


def build_models(args, device):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.models.parallel import ParallelSettings
    from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel
    from scripts.make_tiny_qwen2vl import make_tokenizer, special_token_ids, tiny_config

    tokenizer = make_tokenizer()
    ids = special_token_ids(tokenizer)
    text = {k: getattr(args, k) for k in ("hidden_size", "num_layers") if getattr(args, k)}
    overrides = dict(vocab_size=-(-len(tokenizer) // 128) * 128, **{k: ids[k] for k in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id")})
    if "hidden_size" in text:
        # the tiny config's head_dim (32) and M-RoPE sections stay: more width means more heads
        heads = text["hidden_size"] // 32
        overrides.update(hidden_size=text["hidden_size"], intermediate_size=text["hidden_size"] * 2,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1))
    if "num_layers" in text:
        overrides["num_hidden_layers"] = text["num_layers"]
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(config).to(device=device, dtype=torch_dtype(args.dtype))
    hf.eval()

    cfg = Qwen2VLConfig.from_hf(config.to_dict())
    cfg.dtype = args.dtype
    ours = Qwen2VLModel(cfg, ParallelSettings(tensor_parallel=1))
    ours.load_full_state(QWEN2VL.hf_to_mm({k: v.detach().cpu() for k, v in hf.state_dict().items()}, cfg), 0, 0)
    return tokenizer, hf, ours.to(device).eval(), cfg


def build_prompts(args, tokenizer, folder):
    import numpy as np
    from PIL import Image

    from mindspeed_mm.inference.prompts import PromptBuilder, chat_conversation
    from scripts.make_tiny_qwen2vl import make_image_processor

    images = []
    if not args.no_image:
        path = os.path.join(folder, "bench.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
        images = [path]
    builder = PromptBuilder(tokenizer, make_image_processor(), 32768)
    prompt = builder.build(chat_conversation("Describe the picture in detail.", images), "bench")
    return builder.batch([prompt] * args.batch_size)


def hf_inputs(batch, cfg, device, dtype):
    import torch

    ids = torch.tensor(batch.input_ids, device=device)  # same length: no padding
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == cfg.image_token_id).int())
    if batch.pixel_values is not None:
        out.update(pixel_values=batch.pixel_values.to(device, dtype), image_grid_thw=batch.image_grid_thw.to(device))
    return out


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-image", action="store_true", help="a text-only prompt")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "npu"))
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--hidden-size", type=int, help="LLM width (default: the tiny config's)")
    p.add_argument("--num-layers", type=int, help="LLM layers (default: the tiny config's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures here (scripts/bench_report.py rows)")
    args = p.parse_args(argv)
    if args.hidden_size and args.hidden_size % 64:
        p.error("--hidden-size: must be a multiple of 64 (heads of 32 dims, two query heads per KV head)")

    from mindspeed_mm.platform import setup_platform

    platform = setup_platform(args.device)
    import torch

    from mindspeed_mm.inference.arguments import GenerationSettings
    from mindspeed_mm.inference.generate import Generator
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29517")
    init_distributed(platform, 1, 1, seed=0)
    device = platform.device(0)
    tokenizer, hf, ours, cfg = build_models(args, device)
    with tempfile.TemporaryDirectory() as folder:
        batch = build_prompts(args, tokenizer, folder)
    pad = tokenizer.pad_token_id
    hf_kwargs = hf_inputs(batch, cfg, device, next(hf.parameters()).dtype)

    def ours_run(n):
        gen = Generator(ours, cfg, GenerationSettings(max_new_tokens=n), stop_ids=[], pad_id=pad)
        return lambda: gen.generate(batch)

    def hf_run(n):
        def run():
            with torch.no_grad():
                out = hf.generate(**hf_kwargs, max_new_tokens=n, do_sample=False, pad_token_id=pad)
            return out[:, hf_kwargs["input_ids"].shape[1]:].tolist()
        return run

    n, b = args.new_tokens, args.batch_size
    rows = {}
    for name, run in (("ours (megatron static KV cache)", ours_run), ("HF generate", hf_run)):
        t1, _ = best_time(run(1), args.repeats)
        tn, tokens = best_time(run(n), args.repeats)
        # Decode rate from the difference of two best-of runs; under heavy load that difference can
        # vanish or go negative, then fall back to the whole run's rate (a lower bound).
        rate = (n - 1) * b / (tn - t1) if tn > 1.05 * t1 else n * b / tn
        rows[name] = (t1, rate, tokens)
    (_, _, ours_tokens), (_, _, hf_tokens) = rows.values()
    setup = (f"random Qwen2-VL: LLM {cfg.text.num_layers} layers x {cfg.text.hidden_size}, ViT "
             f"{cfg.vision.num_layers} x {cfg.vision.hidden_size}; prompt {len(batch.input_ids[0])} tokens "
             f"({0 if args.no_image else 1} image), batch {b}, {n} new tokens, {args.dtype} on {device}, "
             f"{torch.get_num_threads()} CPU threads")
    print(setup)
    print(f"{'':34s}{'prefill+1st token s':>20s}{'decode tokens/s':>18s}")
    for name, (t1, rate, _) in rows.items():
        print(f"{name:34s}{t1:20.4f}{rate:18.1f}")
    print(f"same greedy tokens: {'yes' if ours_tokens == hf_tokens else 'NO'}")
    if args.json:
        from scripts.bench_report import row, write_rows

        (t1, rate, _), (hf_t1, hf_rate, _) = rows.values()
        same = f"same greedy tokens: {'yes' if ours_tokens == hf_tokens else 'NO'}"
        write_rows(args.json, setup, [
            row(f"decode, batch {b}", "tokens/s", "higher", rate, hf_rate, "HF generate", same),
            row("prefill + first token", "s", "lower", t1, hf_t1, "HF generate")])
    destroy_distributed()


if __name__ == "__main__":
    main()
