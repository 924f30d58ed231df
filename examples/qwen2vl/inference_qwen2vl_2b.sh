#!/bin/bash
# Chat with Qwen2-VL-2B-Instruct or a fine-tuned checkpoint of it.  Run from the repository root:
#     bash examples/qwen2vl/inference_qwen2vl_2b.sh --image ./data/demo.jpg --prompt "Describe this image."
#     bash examples/qwen2vl/inference_qwen2vl_2b.sh --input ./data/eval.json --output ./logs/answers.jsonl
#     bash examples/qwen2vl/inference_qwen2vl_2b.sh --image ./data/demo.jpg --prompt $'<image>\nWhat is in it?'
# (an <image> in --prompt places the --image there, as in training records; without one the images come first)
# Stop ids: the --tokenizer-path folder's own (generation_config.json, else its <|im_end|>, <|endoftext|>).
# Settings: examples/qwen2vl/inference_qwen2vl_2b.json; extra flags win over it.  From the environment, e.g.
#     TP=2 LOAD_PATH=save_dir ITERATION=5000 bash examples/qwen2vl/inference_qwen2vl_2b.sh --prompt "Hello"
# All flags: python inference_qwen2vl.py --help

INFERENCE_CONFIG=${INFERENCE_CONFIG:-./examples/qwen2vl/inference_qwen2vl_2b.json}
TP=${TP:-1}

source "$(dirname "${BASH_SOURCE[0]}")/inference_qwen2vl_common.sh"
