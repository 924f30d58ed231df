"""Fine-tune Qwen2-VL (the guide's entry point; launched by examples/qwen2vl/finetune_qwen2vl_*.sh).

    torchrun --nproc_per_node N pretrain_qwen2vl.py --mm-data data.json --mm-model model.json \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 1 ...

All flags: ``python pretrain_qwen2vl.py --help``; the loop is mindspeed_mm/training/train.py.
"""
import sys

from mindspeed_mm.errors import cli_main
from mindspeed_mm.training.train import main

if __name__ == "__main__":
    cli_main(main)()
    sys.exit(0)
