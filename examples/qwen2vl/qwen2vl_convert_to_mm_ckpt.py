"""Convert a Hugging Face Qwen2-VL checkpoint to our Megatron layout, any TP x PP split, in one step.

    python examples/qwen2vl/qwen2vl_convert_to_mm_ckpt.py \
        --load-dir ckpt/hf_path/Qwen2-VL-7B-Instruct --save-dir ckpt/Qwen2-VL-7B-Instruct \
        --tensor-parallel-size 1 --pipeline-layer-index 0 0 10 20

Writes SAVE_DIR/latest_checkpointed_iteration.txt ("release"),
SAVE_DIR/release/mp_rank_XX[_YYY]/model_optim_rng.pt, SAVE_DIR/release/layout.json (TP and
LLM layers per stage, read by training, inference and the HF export) and SAVE_DIR/model.json
(usable as --mm-model).  `--pipeline-layer-index 0` (or `--pipeline-num-layers N`) means no PP.
Stage lists take either spelling: `0 0 10 20` or `0,0,10,20` (as the launchers take them).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from checkpoint.convert import convert_hf_to_mm  # noqa: E402
from mindspeed_mm.models.parallel import parse_int_list  # noqa: E402
from mindspeed_mm.constants import DTYPES  # noqa: E402
from mindspeed_mm.errors import cli_main  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load-dir", default="ckpt/hf_path/Qwen2-VL-7B-Instruct", help="HF checkpoint folder")
    ap.add_argument("--save-dir", default="ckpt/Qwen2-VL-7B-Instruct", help="output folder (must be empty)")
    ap.add_argument("--tensor-parallel-size", "--target-tensor-parallel-size", type=int, default=1)
    stages = ap.add_mutually_exclusive_group()
    stages.add_argument("--pipeline-layer-index", nargs="+", default=None,
                        help="first LLM layer of each pipeline stage, as 0 0 10 20 or 0,0,10,20 "
                             "(default: 0,0,10,20, the guide's split)")
    stages.add_argument("--pipeline-num-layers", nargs="+", default=None,
                        help="LLM layers per pipeline stage, as 0 10 10 8 or 0,10,10,8")
    ap.add_argument("--num-layers", type=int, default=None, help="checked against the HF config")
    ap.add_argument("--params-dtype", choices=DTYPES, default=None,
                    help="default: keep the checkpoint's own dtype")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.pipeline_layer_index = parse_int_list(args.pipeline_layer_index, "--pipeline-layer-index")
    args.pipeline_num_layers = parse_int_list(args.pipeline_num_layers, "--pipeline-num-layers")
    if args.pipeline_layer_index is None and args.pipeline_num_layers is None:
        args.pipeline_layer_index = [0, 0, 10, 20]
    return args


@cli_main
def main(argv=None):
    args = parse_args(argv)  # inside cli_main: a bad stage list is one error line
    summary = convert_hf_to_mm(
        args.load_dir, args.save_dir, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_layer_index=args.pipeline_layer_index, pipeline_num_layers=args.pipeline_num_layers,
        num_layers=args.num_layers, params_dtype=args.params_dtype, overwrite=args.overwrite,
        progress=not args.no_progress)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
