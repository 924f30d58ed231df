"""Export one of our checkpoints (any TP x PP layout, release or iter_N) back to Hugging Face format.

    python examples/qwen2vl/qwen2vl_convert_to_hf.py --load-dir ckpt/save_dir \
        --save-dir ckpt/Qwen2-VL-7B-finetuned --hf-dir ckpt/hf_path/Qwen2-VL-7B-Instruct

Writes sharded safetensors (hub key layout) with model.safetensors.index.json and
copies config, tokenizer, processor and generation files from --hf-dir; the layout is
read from the checkpoint (its layout.json when present, checked against the rank files); the folder
loads with Qwen2VLForConditionalGeneration.from_pretrained and serves with vLLM.

A LoRA save (it has lora.json) exports as a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors, for peft.PeftModel.from_pretrained on --hf-dir's model, or vLLM's LoRA
serving); with --merge-lora, as a full HF folder with the adapters folded into their base's weights.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from checkpoint.convert import DEFAULT_MAX_SHARD_BYTES, convert_mm_to_hf  # noqa: E402
from checkpoint.lora_io import export_lora, read_lora_record  # noqa: E402
from mindspeed_mm.constants import DTYPES  # noqa: E402
from mindspeed_mm.errors import UserError, cli_main  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load-dir", required=True, help="our checkpoint folder (holds latest_checkpointed_iteration.txt)")
    ap.add_argument("--save-dir", required=True, help="output HF folder (must be empty)")
    ap.add_argument("--hf-dir", required=True, help="the original HF folder: config, tokenizer, processor")
    ap.add_argument("--iteration", type=int, default=None,
                    help="export iter_N instead of the one latest_checkpointed_iteration.txt names")
    ap.add_argument("--params-dtype", choices=DTYPES, default=None,
                    help="default: keep the checkpoint's dtype")
    ap.add_argument("--max-shard-size-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                    help="safetensors shards of at most this size (default 2), written side by side")
    ap.add_argument("--merge-lora", action="store_true",
                    help="a LoRA save: write the full model with the adapters merged, not a PEFT adapter folder")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    common = dict(iteration=args.iteration, params_dtype=args.params_dtype, overwrite=args.overwrite)
    if read_lora_record(args.load_dir) is not None:
        summary = export_lora(args.load_dir, args.save_dir, args.hf_dir, merge=args.merge_lora,
                              **({"max_shard_bytes": int(args.max_shard_size_gb * 1e9),
                                  "progress": not args.no_progress} if args.merge_lora else {}), **common)
    elif args.merge_lora:
        raise UserError(f"--merge-lora: --load-dir {args.load_dir} is not a LoRA save (it has no lora.json)")
    else:
        summary = convert_mm_to_hf(args.load_dir, args.save_dir, args.hf_dir,
                                   max_shard_bytes=int(args.max_shard_size_gb * 1e9),
                                   progress=not args.no_progress, **common)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
