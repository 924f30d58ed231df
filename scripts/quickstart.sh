#!/usr/bin/env bash
# The whole recipe on a tiny random Qwen2-VL, on the CPU, in a few minutes:
#     bash scripts/quickstart.sh
# It runs the README's guide step by step with the guide's own entry points:
#   1. install what is missing          pip install torch==2.13.0 / pip install -e .
#   2. a tiny HF model                  scripts/make_tiny_qwen2vl.py (stands in for the hub download)
#   3. weight conversion                examples/qwen2vl/modelconvert.sh (TP=1, and a 2-stage pipeline split)
#   4. dataset                          scripts/make_tiny_dataset.py (stands in for COCO + LLaVA-Instruct)
#                                       -> examples/qwen2vl/llava_instruct_2_mllm_demo_format.py -> data.json
#   5. fine-tuning                      examples/qwen2vl/finetune_qwen2vl_2b.sh (TP=1, then PP=2 on 2 processes)
#   6. inference on training images     examples/qwen2vl/inference_qwen2vl_2b.sh --input ... --output ...
#   7. export back to HF                examples/qwen2vl/qwen2vl_convert_to_hf.py, loaded with transformers
# Everything goes under ./ckpt, ./data and ./logs (git-ignored).  Re-running is safe: the model and
# the images are reused when complete, every other output is replaced.
# Knobs (environment): QS_IMAGES, QS_ITERS, QS_LR, QS_GBS, QS_PP_ITERS (0 skips the PP=2 run),
# QS_PACKING (a pack size in tokens, e.g. 256: both runs pack samples into rows of at most that many
# tokens; QS_GBS then counts packs and defaults to 3, about 8 samples; 0, the default, trains unpacked),
# QS_LORA (a LoRA rank, e.g. 16: both runs train LoRA adapters with finetune_qwen2vl_2b_lora.sh, QS_LR
# defaults to 3e-3, and the export writes a PEFT adapter folder and the merged model; 0: full fine-tuning).
# LoRA trains neither the output layer nor the final norm, and a random head (std 0.02) cannot make any
# token likely (loss stays above ~5), so the LoRA variant starts from a tiny model whose head is 10x
# sharper, as a pretrained one's is: ckpt/hf_path/tiny-Qwen2-VL-sharp (make_tiny_qwen2vl.py --head-scale).
# QS_FAMILY (qwen2_vl, the default, or qwen2_5_vl: the whole recipe on a tiny Qwen2.5-VL instead, with the
# same launchers; the converted checkpoint's model.json names the family).
# QS_VIDEO (a clip count, e.g. 16: scripts/make_tiny_clips.py draws that many clips of a square moving left,
# right, up or down, trained on beside the images with "Which way does the square move?"; inference then
# answers them too; 0, the default: images only).
set -eo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS

QS_IMAGES=${QS_IMAGES:-24}
QS_ITERS=${QS_ITERS:-300}
QS_LORA=${QS_LORA:-0}
if [ "$QS_LORA" -gt 0 ]; then QS_LR=${QS_LR:-3e-3}; else QS_LR=${QS_LR:-2e-3}; fi
QS_PACKING=${QS_PACKING:-0}
if [ "$QS_PACKING" -gt 0 ]; then QS_GBS=${QS_GBS:-3}; else QS_GBS=${QS_GBS:-8}; fi
QS_PP_ITERS=${QS_PP_ITERS:-8}
QS_VIDEO=${QS_VIDEO:-0}
QS_FAMILY=${QS_FAMILY:-qwen2_vl}
# The clips' sampling, as scripts/quickstart_steps.py VIDEO_SETTINGS writes it into data.json.
VIDEO_FLAGS=(--video-fps 4 --video-min-frames 4 --video-max-frames 8 --video-min-pixels $((56 * 56))
             --video-max-pixels $((112 * 112)))
MIN_PIXELS=$((56 * 56))
MAX_PIXELS=$((112 * 112))

NAME=tiny-Qwen2-VL
MAKE_MODEL=()
case "$QS_FAMILY" in
    qwen2_vl) ;;
    qwen2_5_vl) NAME=tiny-Qwen2.5-VL; MAKE_MODEL=(--family qwen2_5_vl) ;;
    *) echo "error: QS_FAMILY=$QS_FAMILY: one of qwen2_vl, qwen2_5_vl" >&2; exit 2 ;;
esac
if [ "$QS_LORA" -gt 0 ]; then NAME=$NAME-sharp; MAKE_MODEL+=(--head-scale 10); fi
HF_DIR=ckpt/hf_path/$NAME                 # the guide's ckpt/hf_path/Qwen2-VL-7B-Instruct
MM_DIR=ckpt/$NAME                         # converted, TP=1 (the guide's ckpt/Qwen2-VL-7B-Instruct)
MM_PP_DIR=ckpt/$NAME-pp2                  # converted, pipeline stages [ViT + embedding | 2 LLM layers]
DATA_DIR=data/tiny
SAVE_DIR=ckpt/save_dir/$NAME
SAVE_PP_DIR=ckpt/save_dir/$NAME-pp2
EXPORT_DIR=ckpt/hf_path/$NAME-finetuned
LOGS=logs/quickstart

export PYTHONWARNINGS=ignore   # megatron-core warns about optional fused kernels at every import
export MM_DEVICE=cpu DEVICE=cpu
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

# Training lines: all of them in the log file, on the terminal the first, every 25th and the last.
every_25th() { awk -v last="$1" '{ if (match($0, / iteration +[0-9]+\//)) { n = substr($0, RSTART, RLENGTH)
    gsub(/[^0-9]/, "", n); if (n != 1 && n % 25 && n != last) next } print; fflush() }'; }
free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

step() { printf '\n\033[1m[%s/7] %s\033[0m  (%ds so far)\n' "$1" "$2" "$((SECONDS - START))"; }

# ---- 1. environment ---------------------------------------------------------------------------
step 1 "environment: install what is missing"
if ! python -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null; then
    echo "error: the launchers run 'python', which must be Python >= 3.10 (found: $(python --version 2>&1 || echo none))" >&2
    exit 2
fi
if ! python -c "import torch" 2>/dev/null; then
    # Takes the CPU build where pip is pointed at one (as on CI machines); elsewhere PyPI's default build,
    # which also runs on the CPU (PIP_INDEX_URL=https://download.pytorch.org/whl/cpu gets the small one).
    echo "torch is missing: pip install torch==2.13.0"
    python -m pip install torch==2.13.0
fi
VERSIONS='import importlib.metadata as m, torch, megatron.core, transformers, safetensors, PIL, tqdm
m.version("mindspeed_mm")  # installed (pip install -e .), not only importable from here
print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, "
      f"{torch.get_num_threads()} CPU threads")'
if ! python -c "$VERSIONS" 2>/dev/null; then
    echo "project dependencies are missing: pip install -e ."
    python -m pip install -e .
    python -c "$VERSIONS"
fi
if ! command -v torchrun >/dev/null; then
    echo "error: torchrun (installed with torch) is not on PATH; add pip's script folder to PATH" >&2
    exit 2
fi
mkdir -p ckpt data "$LOGS"

# ---- 2. the "downloaded" HF checkpoint ---------------------------------------------------------
step 2 "a tiny random $NAME in Hugging Face format -> $HF_DIR"
if [ -f "$HF_DIR/model.safetensors" ] && [ -f "$HF_DIR/tokenizer.json" ]; then
    echo "reusing $HF_DIR"
else
    rm -rf "$HF_DIR" "$HF_DIR.tmp"
    python scripts/make_tiny_qwen2vl.py --save-dir "$HF_DIR.tmp" --min-pixels $MIN_PIXELS --max-pixels $MAX_PIXELS \
        "${MAKE_MODEL[@]}" \
        >/dev/null  # it names the temporary folder; the final one is printed below
    mv "$HF_DIR.tmp" "$HF_DIR"
    echo "wrote $NAME to $HF_DIR"
fi

# ---- 3. weight conversion -----------------------------------------------------------------------
step 3 "weight conversion HF -> Megatron layout (modelconvert.sh)"
LOAD_DIR=$HF_DIR SAVE_DIR=$MM_DIR TP=1 PIPELINE_LAYER_INDEX=0 PARAMS_DTYPE=fp32 \
    bash examples/qwen2vl/modelconvert.sh --overwrite
if [ "$QS_PP_ITERS" -gt 0 ]; then
    # The guide's 7B layout in miniature: the first stage holds only the ViT and the embedding.
    LOAD_DIR=$HF_DIR SAVE_DIR=$MM_PP_DIR TP=1 PIPELINE_LAYER_INDEX="0 0" PARAMS_DTYPE=fp32 \
        bash examples/qwen2vl/modelconvert.sh --overwrite
fi

# ---- 4. dataset ---------------------------------------------------------------------------------
step 4 "dataset: $QS_IMAGES drawn images in LLaVA-Instruct format -> MLLM format -> data.json"
if [ -f "$DATA_DIR/llava_instruct_tiny.json" ] && [ "$(ls "$DATA_DIR/train2017" 2>/dev/null | wc -l)" = "$QS_IMAGES" ]; then
    echo "reusing $DATA_DIR/train2017 and $DATA_DIR/llava_instruct_tiny.json"
else
    rm -rf "$DATA_DIR"
    python scripts/make_tiny_dataset.py --out-dir "$DATA_DIR" --num-images "$QS_IMAGES"
fi
VIDEOS=()
if [ "$QS_VIDEO" -gt 0 ]; then
    python scripts/make_tiny_clips.py "$DATA_DIR" --count "$QS_VIDEO"
    VIDEOS=(--videos "$DATA_DIR/tiny_videos.json")
fi
python examples/qwen2vl/llava_instruct_2_mllm_demo_format.py \
    --llava-json "$DATA_DIR/llava_instruct_tiny.json" \
    --image-dir "$DATA_DIR/train2017" \
    --output "$DATA_DIR/mllm_format_llava_instruct_data.json"
python scripts/quickstart_steps.py data-json --out "$DATA_DIR/data.json" --model-dir "$HF_DIR" \
    --dataset "$DATA_DIR/mllm_format_llava_instruct_data.json" --dataset-dir "$DATA_DIR" \
    --cache-dir "$DATA_DIR/cache_dir" --min-pixels $MIN_PIXELS --max-pixels $MAX_PIXELS "${VIDEOS[@]}"

# ---- 5. fine-tuning -----------------------------------------------------------------------------
LAUNCHER=examples/qwen2vl/finetune_qwen2vl_2b.sh
LORA_ENV=()
if [ "$QS_LORA" -gt 0 ]; then
    LAUNCHER=examples/qwen2vl/finetune_qwen2vl_2b_lora.sh
    LORA_ENV=(LORA_RANK="$QS_LORA" LORA_ALPHA=$((2 * QS_LORA)) LORA_DROPOUT=0)
fi
PACKING=()
UNIT=samples
if [ "$QS_PACKING" -gt 0 ]; then PACKING=(--packing-max-tokens "$QS_PACKING"); UNIT="packs of at most $QS_PACKING tokens"; fi
step 5 "fine-tuning: $(basename $LAUNCHER), TP=1, $QS_ITERS iterations of $QS_GBS $UNIT"
rm -rf "$SAVE_DIR" "$SAVE_PP_DIR" "$LOGS"/*.log "$LOGS"/launcher
TRAIN_ENV=(MM_DATA="$DATA_DIR/data.json" PRECISION=fp32 MBS=1 GBS="$QS_GBS" SEQ_LEN=1024 LR="$QS_LR"
           MIN_LR=1e-5 LR_WARMUP_FRACTION=0.05 CLIP_GRAD=1.0 LOG_DIR="$LOGS/launcher" "${LORA_ENV[@]}")
env "${TRAIN_ENV[@]}" GPUS_PER_NODE=1 TP=1 PP=1 MM_MODEL="$MM_DIR/model.json" LOAD_PATH="$MM_DIR" \
    SAVE_PATH="$SAVE_DIR" TRAIN_ITERS="$QS_ITERS" LOG_INTERVAL=1 MASTER_PORT="$(free_port)" \
    bash $LAUNCHER --device cpu "${PACKING[@]}" | tee "$LOGS/train_tp1.log" \
    | every_25th "$QS_ITERS"
if [ "$QS_PP_ITERS" -gt 0 ]; then
    echo
    echo "the same fine-tuning on 2 pipeline stages (2 processes), $QS_PP_ITERS iterations: the losses follow the TP=1 run"
    env "${TRAIN_ENV[@]}" GPUS_PER_NODE=2 TP=1 PP=2 PIPELINE_NUM_LAYERS=0,2 MM_MODEL="$MM_PP_DIR/model.json" \
        LOAD_PATH="$MM_PP_DIR" SAVE_PATH="$SAVE_PP_DIR" TRAIN_ITERS="$QS_PP_ITERS" LOG_INTERVAL=1 \
        OMP_NUM_THREADS=1 MASTER_PORT="$(free_port)" \
        bash $LAUNCHER --device cpu --lr-decay-iters "$QS_ITERS" "${PACKING[@]}" \
        | tee "$LOGS/train_pp2.log"
fi

# ---- 6. inference -------------------------------------------------------------------------------
step 6 "inference on the training images: inference_qwen2vl_2b.sh --input ... --output $LOGS/answers.jsonl"
# Stop ids come from the tiny model's own tokenizer / generation_config.json, as for any HF folder.
LOAD_PATH=$SAVE_DIR TOKENIZER_PATH=$HF_DIR MAX_NEW_TOKENS=24 MASTER_PORT="$(free_port)" \
    bash examples/qwen2vl/inference_qwen2vl_2b.sh --input "$DATA_DIR/mllm_format_llava_instruct_data.json" \
    --output "$LOGS/answers.jsonl" --batch-size 8
rm -f "$LOGS/answers_videos.jsonl"
if [ "$QS_VIDEO" -gt 0 ]; then
    echo "and on the training clips: --input $DATA_DIR/tiny_videos.json ${VIDEO_FLAGS[*]}"
    LOAD_PATH=$SAVE_DIR TOKENIZER_PATH=$HF_DIR MAX_NEW_TOKENS=8 MASTER_PORT="$(free_port)" \
        bash examples/qwen2vl/inference_qwen2vl_2b.sh --input "$DATA_DIR/tiny_videos.json" \
        --output "$LOGS/answers_videos.jsonl" --batch-size 8 "${VIDEO_FLAGS[@]}"
fi

# ---- 7. export ----------------------------------------------------------------------------------
step 7 "export the fine-tuned checkpoint to Hugging Face format -> $EXPORT_DIR"
MERGE=()
if [ "$QS_LORA" -gt 0 ]; then
    echo "the LoRA adapters as a PEFT folder -> $EXPORT_DIR-adapter (PeftModel.from_pretrained on $HF_DIR)"
    python examples/qwen2vl/qwen2vl_convert_to_hf.py --load-dir "$SAVE_DIR" --save-dir "$EXPORT_DIR-adapter" \
        --hf-dir "$HF_DIR" --overwrite
    MERGE=(--merge-lora)  # and merged into the base: the folder checked below
fi
python examples/qwen2vl/qwen2vl_convert_to_hf.py --load-dir "$SAVE_DIR" --save-dir "$EXPORT_DIR" \
    --hf-dir "$HF_DIR" --overwrite "${MERGE[@]}"
python scripts/quickstart_steps.py check-export --export-dir "$EXPORT_DIR" \
    --input "$DATA_DIR/mllm_format_llava_instruct_data.json" --answers "$LOGS/answers.jsonl" \
    --count 4 --out "$LOGS/export_check.json"

echo
python scripts/quickstart_steps.py report --train-log "$LOGS/train_tp1.log" --pp-log "$LOGS/train_pp2.log" \
    --pp-label "PP=2, stages [ViT+embedding | 2 layers]" --answers "$LOGS/answers.jsonl" \
    --video-answers "$LOGS/answers_videos.jsonl" \
    --export-check "$LOGS/export_check.json" --seconds "$((SECONDS - START))"
