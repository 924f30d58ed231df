#!/bin/bash
# Fine-tune Qwen2-VL-7B-Instruct (the guide's launcher).  Run from the repository root:
#     bash examples/qwen2vl/finetune_qwen2vl_7b.sh [extra flags, which win]
# Override anything from the environment, e.g.
#     GPUS_PER_NODE=4 TP=2 PP=2 LOAD_PATH=save_dir bash examples/qwen2vl/finetune_qwen2vl_7b.sh --train-iters 10
# Re-running with LOAD_PATH set to an earlier SAVE_PATH resumes that run exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2vl/model_7b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2-VL-7B-Instruct}   # written by modelconvert.sh
SAVE_PATH=${SAVE_PATH:-save_dir}

TP=${TP:-1}
PP=${PP:-4}
# LLM layers per pipeline stage: read from the checkpoint (recorded by the conversion, e.g. the
# guide's [0, 0, 10, 20]); PIPELINE_NUM_LAYERS=0,10,10,8 only when the checkpoint has no record.

source "$(dirname "${BASH_SOURCE[0]}")/finetune_qwen2vl_common.sh"
