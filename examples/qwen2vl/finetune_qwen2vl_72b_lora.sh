#!/bin/bash
# LoRA fine-tuning of Qwen2-VL-72B-Instruct: adapters on the LLM's linears train, every base weight
# is frozen (only the adapters get gradients and optimizer state; checkpoints hold only them and name
# their base in SAVE_PATH/lora.json).  Run from the repository root:
#     bash examples/qwen2vl/finetune_qwen2vl_72b_lora.sh [extra flags, which win]
# LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS and everything finetune_qwen2vl_72b.sh reads
# can be set from the environment.  Export: examples/qwen2vl/qwen2vl_convert_to_hf.py (a PEFT adapter
# folder; --merge-lora for a full HF model).  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2vl/model_72b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2-VL-72B-Instruct}   # the base, written by modelconvert.sh (required)
SAVE_PATH=${SAVE_PATH:-save_dir_lora}

# The full launcher's layout (TP=8 x PP=4, 4 nodes), so its converted checkpoint loads as it is.  With
# LoRA 72B also fits 2 nodes at PP=2 (bf16 weights ~9 GB per device): convert with TP=8
# PIPELINE_LAYER_INDEX="0 36" and run NNODES=2 PP=2.
TP=${TP:-8}
PP=${PP:-4}
source "$(dirname "${BASH_SOURCE[0]}")/finetune_qwen2vl_lora_common.sh"
