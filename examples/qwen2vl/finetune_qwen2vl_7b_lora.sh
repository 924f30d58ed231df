#!/bin/bash
# LoRA fine-tuning of Qwen2-VL-7B-Instruct: adapters on the LLM's linears train, every base weight
# is frozen (only the adapters get gradients and optimizer state; checkpoints hold only them and name
# their base in SAVE_PATH/lora.json).  Run from the repository root:
#     bash examples/qwen2vl/finetune_qwen2vl_7b_lora.sh [extra flags, which win]
# LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS and everything finetune_qwen2vl_7b.sh reads
# can be set from the environment.  Export: examples/qwen2vl/qwen2vl_convert_to_hf.py (a PEFT adapter
# folder; --merge-lora for a full HF model).  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2vl/model_7b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2-VL-7B-Instruct}   # the base, written by modelconvert.sh (required)
SAVE_PATH=${SAVE_PATH:-save_dir_lora}

# The full launcher's layout, so the checkpoint modelconvert.sh wrote for it loads as it is (the guide's
# [0, 10, 10, 8] split, read from the checkpoint).  With LoRA 7B also fits one device per process
# (bf16 weights ~16 GB, no gradients or optimizer state for them): convert with PIPELINE_LAYER_INDEX=0
# and run PP=1 for DP=8.
TP=${TP:-1}
PP=${PP:-4}
source "$(dirname "${BASH_SOURCE[0]}")/finetune_qwen2vl_lora_common.sh"
