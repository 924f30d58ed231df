#!/usr/bin/env bash
# One-step weight conversion: Hugging Face Qwen2-VL -> our Megatron layout (any TP x PP split).
# Every variable can be set from the environment, e.g.
#   TP=2 PIPELINE_LAYER_INDEX="0 14" bash examples/qwen2vl/modelconvert.sh
# PIPELINE_LAYER_INDEX is the first LLM layer of each pipeline stage ("0" = no pipeline split), written
# "0 0 10 20" or "0,0,10,20" (the launchers' spelling). The split is recorded in SAVE_DIR/release/layout.json,
# so the fine-tuning and inference launchers need not be given it again.
set -euo pipefail
cd "$(dirname "$0")/../.."

LOAD_DIR=${LOAD_DIR:-ckpt/hf_path/Qwen2-VL-7B-Instruct}   # HF checkpoint
SAVE_DIR=${SAVE_DIR:-ckpt/Qwen2-VL-7B-Instruct}           # converted checkpoint (LOAD_PATH of the launchers)
TP=${TP:-1}
PIPELINE_LAYER_INDEX=${PIPELINE_LAYER_INDEX:-"0 0 10 20"}
PARAMS_DTYPE=${PARAMS_DTYPE:-bf16}

# shellcheck disable=SC2086  # PIPELINE_LAYER_INDEX is a list of numbers
python examples/qwen2vl/qwen2vl_convert_to_mm_ckpt.py \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    --tensor-parallel-size "$TP" \
    --pipeline-layer-index $PIPELINE_LAYER_INDEX \
    --params-dtype "$PARAMS_DTYPE" \
    "$@"
