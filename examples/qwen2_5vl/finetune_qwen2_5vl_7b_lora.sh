#!/bin/bash
# LoRA fine-tuning of Qwen2.5-VL-7B-Instruct (adapters on the LLM's linears; every base weight frozen).
#     bash examples/qwen2_5vl/finetune_qwen2_5vl_7b_lora.sh [extra flags, which win]
# LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS and everything finetune_qwen2_5vl_7b.sh reads can be
# set from the environment (examples/qwen2vl/finetune_qwen2vl_lora_common.sh).  Export:
# examples/qwen2vl/qwen2vl_convert_to_hf.py (a PEFT adapter folder; --merge-lora for a full HF model).

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MM_DATA=${MM_DATA:-./examples/qwen2_5vl/data.json}
MM_MODEL=${MM_MODEL:-./examples/qwen2_5vl/model_7b.json}
LOAD_PATH=${LOAD_PATH-ckpt/Qwen2.5-VL-7B-Instruct}   # the base, written by modelconvert.sh (required)
SAVE_PATH=${SAVE_PATH:-save_dir_lora}

TP=${TP:-1}
PP=${PP:-4}
source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/finetune_qwen2vl_lora_common.sh"
