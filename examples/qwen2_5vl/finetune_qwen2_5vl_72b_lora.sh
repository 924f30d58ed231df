#!/bin/bash
# LoRA fine-tuning of Qwen2.5-VL-72B-Instruct (adapters on the LLM's linears; every base weight frozen).
#     bash examples/qwen2_5vl/finetune_qwen2_5vl_72b_lora.sh [extra flags, which win]
# LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS and everything finetune_qwen2_5vl_72b.sh reads can be
# set from the environment (examples/qwen2vl/finetune_qwen2vl_lora_common.sh).  Export:
# examples/qwen2vl/qwen2vl_convert_to_hf.py (a PEFT adapter folder; --merge-lora for a full HF model).

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2_5vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2_5vl/model_72b.json}
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2.5-VL-72B-Instruct}   # the base, written by modelconvert.sh (required)
SAVE_PATH=${SAVE_PATH:-save_dir_lora}

TP=${TP:-4}
PP=${PP:-8}
source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/finetune_qwen2vl_lora_common.sh"
