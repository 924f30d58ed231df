"""Chat with a Qwen2-VL checkpoint or run it over a file (launched by examples/qwen2vl/inference_qwen2vl_*.sh).

    python inference_qwen2vl.py --load CKPT --tokenizer-path HF_DIR --image a.jpg --prompt "Describe it."
    python inference_qwen2vl.py --load CKPT --tokenizer-path HF_DIR --input eval.json --output answers.jsonl

All flags: ``python inference_qwen2vl.py --help``; the code is mindspeed_mm/inference/.
"""
import sys

from mindspeed_mm.errors import cli_main
from mindspeed_mm.inference.arguments import parse_args
from mindspeed_mm.platform import setup_platform


def main(argv=None):
    args = parse_args(argv)  # flags and the JSON settings only: no megatron yet
    setup_platform(args.device)  # before megatron-core is imported (the CPU routes torch.cuda)
    from mindspeed_mm.inference.main import run  # imports megatron-core

    return run(args)


if __name__ == "__main__":
    cli_main(main)()
    sys.exit(0)
