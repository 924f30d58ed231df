# Shared body of finetune_qwen2vl_{2b,7b,72b}.sh (sourced, not run): the guide's
# GPT_ARGS / MM_ARGS / OUTPUT_ARGS and the torchrun launch.  Every variable is
# overridable from the environment; arguments given to the launcher ("$@") are
# appended last and win over the ones here.
source "$(dirname "${BASH_SOURCE[0]}")/launcher_env.sh"  # set -e, Ascend env when present, ROOT, PYTHONPATH

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=${WORLD_SIZE:-$(($GPUS_PER_NODE * $NNODES))}

SAVE_PATH=${SAVE_PATH:-save_dir}
MBS=${MBS:-1}
DP=$(($WORLD_SIZE / $TP / $PP))
GBS=${GBS:-$(($MBS * $DP * ${GRAD_ACC_STEP:-8}))}
SEQ_LEN=${SEQ_LEN:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-10000}
PRECISION=${PRECISION:-bf16}   # bf16 | fp16 | fp32 (CPU debugging, exactness checks)

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# Model sizes come from MM_MODEL; the training settings are here.
GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    ${PIPELINE_NUM_LAYERS:+--pipeline-num-layers ${PIPELINE_NUM_LAYERS}} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --seq-length ${SEQ_LEN} \
    --variable-seq-lengths \
    --lr ${LR:-1.0e-5} \
    --min-lr ${MIN_LR:-0} \
    --lr-decay-style cosine \
    --lr-warmup-fraction ${LR_WARMUP_FRACTION:-0.1} \
    --weight-decay 0 \
    --clip-grad ${CLIP_GRAD:-0.0} \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --train-iters ${TRAIN_ITERS} \
    --seed 42 \
    --${PRECISION} \
    ${LOAD_PATH:+--load ${LOAD_PATH}} \
    --use-distributed-optimizer \
    --use-flash-attn \
"

MM_ARGS="
    --mm-data ${MM_DATA} \
    --mm-model ${MM_MODEL} \
"

# Evaluation needs a held-out share of the data: add e.g. --split 98,2,0 --eval-interval 500 --eval-iters 10
OUTPUT_ARGS="
    --log-interval ${LOG_INTERVAL:-1} \
    --save-interval ${SAVE_INTERVAL:-5000} \
    --save ${SAVE_PATH} \
    ${TENSORBOARD_DIR:+--tensorboard-dir ${TENSORBOARD_DIR}} \
"

LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
logfile="$LOG_DIR/train_$(date +%Y%m%d_%H%M%S).log"
# Everything below also goes to the log.  The terminal gets one line for a user's mistake (no
# per-rank repeats, no torchrun failure report: mindspeed_mm/training/console.py); the console
# ignores SIGTERM/SIGINT so that it outlives a pre-emption and records the final save.
exec 3>&1 4>&2 > >(exec python -m mindspeed_mm.training.console "$logfile") 2>&1
CONSOLE_PID=$!
finish() {
    exec 1>&3 2>&4  # end of the log: let the console finish writing it
    wait "$CONSOLE_PID" || true
    if [ "$1" != 0 ] && [ -s "$logfile.error" ]; then exit 2; fi  # a user's mistake, already printed
    exit "$1"
}

# Everything that can be checked without the processes, once, before any is started:
# flags, the three JSONs, the checkpoint to load, the save folder.
status=0
WORLD_SIZE=$WORLD_SIZE NODE_RANK=$NODE_RANK python "$ROOT/pretrain_qwen2vl.py" --preflight \
    $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@" || status=$?
[ "$status" = 0 ] || finish "$status"

# Pre-emption (SIGTERM, or SIGINT / Ctrl-C): the training processes finish their iteration,
# save and exit 0.  torchrun must not see the signal: it would kill them 30 s later and fail
# whatever they did.  So torchrun runs in its own session (signals sent to this launcher's
# process group miss it) and this launcher hands the signal to the training processes (its
# children; to torchrun itself while it has none yet); torchrun then sees them succeed and
# the job exits 0.  Signals sent to every process of the job (e.g. Slurm's scancel) still
# reach torchrun, which then forwards them itself and exits non-zero after the save.
# A launcher killed outright (kill -9) takes the job with it: torchrun gets SIGKILL from the
# kernel when this shell dies (orphans.py), and each training process ends when torchrun does.
setsid python -m mindspeed_mm.training.orphans torchrun $DISTRIBUTED_ARGS "$ROOT/pretrain_qwen2vl.py" \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    "$@" &
TORCHRUN_PID=$!
forward() { pkill "-$1" -P "$TORCHRUN_PID" || kill "-$1" "$TORCHRUN_PID" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
# A trapped signal interrupts `wait`: wait again until torchrun has ended (bash keeps its status).
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do wait "$TORCHRUN_PID" || true; done
wait "$TORCHRUN_PID" || status=$?
finish "$status"
