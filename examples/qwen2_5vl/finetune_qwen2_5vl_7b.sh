#!/bin/bash
# Fine-tune Qwen2.5-VL-7B-Instruct.  Run from the repository root:
#     bash examples/qwen2_5vl/finetune_qwen2_5vl_7b.sh [extra flags, which win]
# The same launcher body as Qwen2-VL's (examples/qwen2vl/finetune_qwen2vl_common.sh): every variable it
# reads can be set from the environment.  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2_5vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2_5vl/model_7b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2.5-VL-7B-Instruct}   # written by examples/qwen2_5vl/modelconvert.sh
SAVE_PATH=${SAVE_PATH:-save_dir}

# 7B (28 LLM layers): the Qwen2-VL-7B layout (the ViT on stage 0 with no LLM layer)
TP=${TP:-1}
PP=${PP:-4}
# LLM layers per stage: read from the checkpoint (convert with PIPELINE_LAYER_INDEX="0 0 10 20").
source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/finetune_qwen2vl_common.sh"
