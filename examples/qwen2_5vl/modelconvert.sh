#!/usr/bin/env bash
# One-step weight conversion: Hugging Face Qwen2.5-VL -> our Megatron layout (any TP x PP split), with
# Qwen2.5-VL-7B's paths as defaults; the converter reads the family from config.json (model_type
# qwen2_5_vl).  The same variables as examples/qwen2vl/modelconvert.sh, e.g.
#   LOAD_DIR=ckpt/hf_path/Qwen2.5-VL-72B-Instruct SAVE_DIR=ckpt/Qwen2.5-VL-72B-Instruct TP=4 \
#       PIPELINE_LAYER_INDEX="0 5 16 27 38 49 60 71" bash examples/qwen2_5vl/modelconvert.sh
# Back to HF: examples/qwen2vl/qwen2vl_convert_to_hf.py (any family).
export LOAD_DIR=${LOAD_DIR:-ckpt/hf_path/Qwen2.5-VL-7B-Instruct}   # HF checkpoint
export SAVE_DIR=${SAVE_DIR:-ckpt/Qwen2.5-VL-7B-Instruct}           # converted checkpoint (LOAD_PATH of the launchers)
exec bash "$(dirname "$0")/../qwen2vl/modelconvert.sh" "$@"
