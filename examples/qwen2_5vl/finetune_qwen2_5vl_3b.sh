#!/bin/bash
# Fine-tune Qwen2.5-VL-3B-Instruct.  Run from the repository root:
#     bash examples/qwen2_5vl/finetune_qwen2_5vl_3b.sh [extra flags, which win]
# The same launcher body as Qwen2-VL's (examples/qwen2vl/finetune_qwen2vl_common.sh): every variable it
# reads can be set from the environment.  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2_5vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2_5vl/model_3b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2.5-VL-3B-Instruct}   # written by examples/qwen2_5vl/modelconvert.sh
SAVE_PATH=${SAVE_PATH:-save_dir}

# 3B (36 LLM layers): one device per process, data parallel over all of them
TP=${TP:-1}
PP=${PP:-1}

source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/finetune_qwen2vl_common.sh"
