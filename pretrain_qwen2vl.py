"""Fine-tune Qwen2-VL (the guide's entry point; launched by examples/qwen2vl/finetune_qwen2vl_*.sh).

    torchrun --nproc_per_node N pretrain_qwen2vl.py --mm-data data.json --mm-model model.json \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 1 ...

All flags: ``python pretrain_qwen2vl.py --help``; the loop is mindspeed_mm/training/train.py.
"""
import sys

from mindspeed_mm.errors import cli_main
from mindspeed_mm.platform import setup_platform
from mindspeed_mm.training.arguments import parse_args
from mindspeed_mm.training.orphans import exit_with_parent
from mindspeed_mm.training.preflight import preflight


def main(argv=None):
    config = parse_args(argv)  # flags only: no megatron yet
    if config.paths.preflight:  # the launcher, before torchrun: no device, no processes
        return preflight(config)
    exit_with_parent()  # a killed torchrun / launcher must not leave this process training
    setup_platform(config.paths.device)  # before megatron-core is imported (the CPU routes torch.cuda)
    from mindspeed_mm.training.train import main as train  # imports megatron-core

    return train(config)


if __name__ == "__main__":
    cli_main(main)()
    sys.exit(0)
