#!/bin/bash
# Fine-tune Qwen2.5-VL-32B-Instruct.  Run from the repository root:
#     bash examples/qwen2_5vl/finetune_qwen2_5vl_32b.sh [extra flags, which win]
# The same launcher body as Qwen2-VL's (examples/qwen2vl/finetune_qwen2vl_common.sh): every variable it
# reads can be set from the environment.  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2_5vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2_5vl/model_32b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2.5-VL-32B-Instruct}   # written by examples/qwen2_5vl/modelconvert.sh
SAVE_PATH=${SAVE_PATH:-save_dir}

# 32B (64 LLM layers): TP=4 x PP=4 over 2 nodes; TP at most 4: the ViT's MLP
# (3420 wide) splits over 2 or 4 ranks only
TP=${TP:-4}
PP=${PP:-4}
# LLM layers per stage: read from the checkpoint (convert with TP=4 PIPELINE_LAYER_INDEX="0 12 29 46");
# 2 nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=...
source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/finetune_qwen2vl_common.sh"
