"""Training step time: our training path next to Hugging Face Qwen2-VL + torch AdamW, same weights, same batch.

    python scripts/bench_train.py --steps 8 --batch-size 4 [--json out.json]

Ours is what ``pretrain_qwen2vl.py`` runs, built from launcher flags by the
training code itself (mindspeed_mm/training: megatron DDP, megatron's
distributed optimizer and scheduler, the pipeline schedule's forward/backward,
per-token loss, gradient clipping) on a single gloo process.  The reference is
``Qwen2VLForConditionalGeneration`` (its default attention) with
``torch.optim.AdamW`` and ``clip_grad_norm_``: forward, backward, clip, step.
Both start from the same random weights (HF -> ours through the project's
mapping) and train on the same collated batch of drawn ~448x448 images with
one- or two-turn conversations, in fp32.  Steps are interleaved (ours, HF,
ours, ...) so both see the same machine load; the fastest step of each is
reported (on a shared machine the least disturbed one).  The
losses of both runs are compared step by step: they must agree (same math).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mrope_section(head_dim: int) -> list:
    """Split head_dim/2 rotary pairs over (t, h, w) like Qwen2-VL's [16, 24, 24] for 128."""
    pairs = head_dim // 2
    t = pairs // 4
    h = (pairs - t) // 2
    return [t, h, pairs - t - h]


def hf_config(tokenizer, args):
    """A transformers Qwen2VLConfig of the benchmark's sizes with the tiny tokenizer's ids."""
    from scripts.make_tiny_qwen2vl import special_token_ids, tiny_config

    ids = special_token_ids(tokenizer)
    head_dim = args.hidden_size // args.heads
    return tiny_config(
        vision_config=dict(depth=args.vit_layers, embed_dim=args.vit_hidden_size, num_heads=args.vit_heads,
                           mlp_ratio=4),
        vocab_size=-(-len(tokenizer) // 128) * 128, hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, pad_token_id=ids["pad_token_id"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section(head_dim)},
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})


def make_batch(folder: str, samples: int, min_pixels: int, max_pixels: int):
    """(tokenizer, collated batch) of `samples` drawn conversations through our data pipeline."""
    from mindspeed_mm.data.builder import build_train_valid_datasets
    from mindspeed_mm.data.collate import Qwen2VLCollator
    from mindspeed_mm.data.config import data_config_from_dict
    from scripts.bench_preprocess import make_samples
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    hf_dir = os.path.join(folder, "processor")
    make_tiny_qwen2vl(hf_dir, with_model=False, min_pixels=min_pixels, max_pixels=max_pixels)
    data = make_samples(folder, samples)
    cfg = data_config_from_dict({
        "dataset_param": {
            "preprocess_parameters": {"model_name_or_path": hf_dir, "min_pixels": min_pixels,
                                      "max_pixels": max_pixels},
            "basic_parameters": {"dataset": data, "cache_dir": os.path.join(folder, "cache"), "cutoff_len": 4096}},
        "dataloader_param": {"batch_size": samples, "num_workers": 0, "shuffle": False},
    })
    dataset, _ = build_train_valid_datasets(cfg, progress=False, log=lambda *_: None)
    batch = Qwen2VLCollator(dataset.pad_token_id)([dataset[i] for i in range(samples)])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir), batch


def build_ours(flags, model_cfg, world_size: int = 1):
    """The training stack of pretrain_qwen2vl.py from launcher flags: (config, DDP model, optimizer, scheduler).
    Call after init_distributed."""
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.build import build_model, build_optimizer
    from mindspeed_mm.training.config import validate

    config = validate(parse_args(flags), model_cfg, world_size)
    model = build_model(config, model_cfg)
    optimizer, scheduler = build_optimizer(config, model)
    return config, model, optimizer, scheduler


def training_flags(model_json: str, batch_size: int, lr: float, precision: str = "fp32", extra=()):
    """The launcher's optimisation flags with a constant learning rate (nothing else differs from HF)."""
    return ["--mm-data", "unused.json", "--mm-model", model_json, f"--{precision}",
            "--micro-batch-size", str(batch_size), "--global-batch-size", str(batch_size),
            "--variable-seq-lengths", "--train-iters", "1000000", "--lr", str(lr), "--min-lr", "0",
            "--lr-decay-style", "constant", "--weight-decay", "0", "--clip-grad", "1.0",
            "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--use-distributed-optimizer", *extra]


def add_model_args(ap):
    """The benchmark model's size flags (defaults: LLM 4 x 512, ViT 4 x 256, 18.5M parameters)."""
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--ffn-hidden-size", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vit-hidden-size", type=int, default=256)
    ap.add_argument("--vit-layers", type=int, default=4)
    ap.add_argument("--vit-heads", type=int, default=4)


def build_same_weights(folder: str, tokenizer, args, flags_of):
    """(HF model, config, DDP model, optimizer, scheduler): a random HF Qwen2-VL of ``args``' sizes (seed 0, fp32,
    train mode) and our training stack built from ``flags_of(model_json)`` with the same weights loaded.
    Call after init_distributed; ``folder`` receives model.json."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.training.checkpointing import unwrap

    config = hf_config(tokenizer, args)
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(config).float().train()
    cfg = Qwen2VLConfig.from_hf(config.to_dict())
    cfg.dtype = "fp32"
    model_json = os.path.join(folder, "model.json")
    cfg.save(model_json)
    train_args, model, optimizer, scheduler = build_ours(flags_of(model_json), cfg)
    unwrap(model).load_full_state(QWEN2VL.hf_to_mm({k: v.detach().clone() for k, v in hf.state_dict().items()}, cfg))
    optimizer.reload_model_params()  # the optimizer's main copies from the loaded weights, as after --load
    model.train()
    return hf, train_args, model, optimizer, scheduler


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="samples per step (one micro-batch)")
    add_model_args(ap)
    ap.add_argument("--max-pixels", type=int, default=224 * 224)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch

    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.step import train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29519")
    init_distributed(platform, 1, 1, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, batch = make_batch(folder, args.batch_size, 56 * 56, args.max_pixels)
        hf, train_args, model, optimizer, scheduler = build_same_weights(
            folder, tokenizer, args, lambda model_json: training_flags(model_json, args.batch_size, args.lr))

    hf_opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    hf_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "labels")
    hf_batch = {k: batch[k] for k in hf_keys}
    iterations = itertools.count(1)

    def ours_step():
        return train_step(model, optimizer, scheduler, [batch], train_args, iteration=next(iterations)).loss

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        loss = hf(**hf_batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        return float(loss)

    times = {"ours": [], "hf": []}
    loss_curves = {"ours": [], "hf": []}
    for step in range(args.warmup + args.steps):
        for name, fn in (("ours", ours_step), ("hf", hf_step)):
            took, loss = timed(fn)
            loss_curves[name].append(loss)
            if step >= args.warmup:
                times[name].append(took)
    destroy_distributed()

    ours_ms, hf_ms = (min(times[k]) * 1000 for k in ("ours", "hf"))
    gap = max(abs(a - b) for a, b in zip(loss_curves["ours"], loss_curves["hf"]))
    tokens = int(batch["attention_mask"].sum())
    params = sum(p.numel() for p in hf.parameters())
    setup = (f"random Qwen2-VL {params / 1e6:.1f}M parameters (LLM {args.layers} x {args.hidden_size}, ViT "
             f"{args.vit_layers} x {args.vit_hidden_size}), batch {args.batch_size} samples = {tokens} tokens "
             f"({int(batch['image_grid_thw'].prod(-1).sum())} image patches) padded to "
             f"{tuple(batch['input_ids'].shape)}, fp32, CPU, {torch.get_num_threads()} threads")
    print(setup)
    last = f"at step {len(loss_curves['hf'])}"
    print(f"{'':44s}{'ms/step (fastest)':>18s}{'loss at step 1':>16s}{last:>14s}")
    for name, label, ms in (("ours", "ours (megatron DDP + distributed Adam)", ours_ms),
                            ("hf", "HF Qwen2VLForConditionalGeneration + AdamW", hf_ms)):
        print(f"{label:44s}{ms:18.1f}{loss_curves[name][0]:16.6f}{loss_curves[name][-1]:14.6f}")
    print(f"ours is {hf_ms / ours_ms:.2f}x the speed of HF; largest loss difference over "
          f"{len(loss_curves['hf'])} steps: {gap:.1e}")
    if args.json:
        from scripts.bench_report import row, write_rows

        write_rows(args.json, setup, [row(
            f"training step, batch {args.batch_size}, CPU fp32", "ms/step", "lower", ours_ms, hf_ms,
            "HF Qwen2-VL + torch AdamW", f"losses agree to {gap:.1e} over {len(loss_curves['hf'])} steps")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
