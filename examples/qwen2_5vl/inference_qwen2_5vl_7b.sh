#!/bin/bash
# Chat with Qwen2.5-VL-7B-Instruct or a fine-tuned checkpoint of it.  Run from the repository root:
#     bash examples/qwen2_5vl/inference_qwen2_5vl_7b.sh --image ./data/demo.jpg --prompt "Describe this image."
#     bash examples/qwen2_5vl/inference_qwen2_5vl_7b.sh --video ./data/demo.mp4 --prompt "What happens?"
#     bash examples/qwen2_5vl/inference_qwen2_5vl_7b.sh --input ./data/eval.json --output ./logs/answers.jsonl
# Settings: examples/qwen2_5vl/inference_qwen2_5vl_7b.json; extra flags win over it (see the Qwen2-VL
# launchers for the environment variables: TP, LOAD_PATH, ITERATION, TOKENIZER_PATH, ...).

INFERENCE_CONFIG=${INFERENCE_CONFIG:-./examples/qwen2_5vl/inference_qwen2_5vl_7b.json}
TP=${TP:-1}

source "$(dirname "${BASH_SOURCE[0]}")/../qwen2vl/inference_qwen2vl_common.sh"
