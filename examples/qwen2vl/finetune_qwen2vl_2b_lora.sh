#!/bin/bash
# LoRA fine-tuning of Qwen2-VL-2B-Instruct: adapters on the LLM's linears train, every base weight
# is frozen (only the adapters get gradients and optimizer state; checkpoints hold only them and name
# their base in SAVE_PATH/lora.json).  Run from the repository root:
#     bash examples/qwen2vl/finetune_qwen2vl_2b_lora.sh [extra flags, which win]
# LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS and everything finetune_qwen2vl_2b.sh reads
# can be set from the environment.  Export: examples/qwen2vl/qwen2vl_convert_to_hf.py (a PEFT adapter
# folder; --merge-lora for a full HF model).  Re-running with LOAD_PATH=SAVE_PATH resumes exactly.

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2vl/model_2b.json}   # or a converted checkpoint's model.json
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2-VL-2B-Instruct}   # the base, written by modelconvert.sh (required)
SAVE_PATH=${SAVE_PATH:-save_dir_lora}

# 2B: one device per process, data parallel over all of them
TP=${TP:-1}
PP=${PP:-1}
source "$(dirname "${BASH_SOURCE[0]}")/finetune_qwen2vl_lora_common.sh"
