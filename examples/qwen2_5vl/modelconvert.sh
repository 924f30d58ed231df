#!/usr/bin/env bash
# One-step weight conversion: Hugging Face Qwen2.5-VL -> our Megatron layout (any TP x PP split); the
# converter reads the family from config.json (model_type qwen2_5_vl).  E.g. for the 7B launcher:
#   bash examples/qwen2_5vl/modelconvert.sh
#   LOAD_DIR=ckpt/hf_path/Qwen2.5-VL-72B-Instruct SAVE_DIR=ckpt/Qwen2.5-VL-72B-Instruct TP=4 \
#       PIPELINE_LAYER_INDEX="0 5 16 27 38 49 60 71" bash examples/qwen2_5vl/modelconvert.sh
# Back to HF: examples/qwen2vl/qwen2vl_convert_to_hf.py (any family).
set -euo pipefail
cd "$(dirname "$0")/../.."

LOAD_DIR=${LOAD_DIR:-ckpt/hf_path/Qwen2.5-VL-7B-Instruct}   # HF checkpoint
SAVE_DIR=${SAVE_DIR:-ckpt/Qwen2.5-VL-7B-Instruct}           # converted checkpoint (LOAD_PATH of the launchers)
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
