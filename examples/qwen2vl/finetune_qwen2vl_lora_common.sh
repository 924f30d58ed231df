#!/bin/bash
# Sourced by finetune_qwen2vl_*_lora.sh after they set the model's paths and layout: LoRA's defaults
# (each can be set from the environment), its flags put before the caller's (so the caller's win),
# then the common launcher.  `set --` here rewrites the sourcing script's arguments, on purpose.

LR=${LR:-1.0e-4}   # adapters learn at LoRA's usual rates, 10x full fine-tuning's
LORA_RANK=${LORA_RANK:-8}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_TARGETS=${LORA_TARGETS:-linear_qkv,linear_proj,linear_fc1,linear_fc2}   # add vision.* / projector.*

set -- --lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" \
    --lora-target-modules "$LORA_TARGETS" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/finetune_qwen2vl_common.sh"
