# Shared body of inference_qwen2vl_{2b,7b}.sh (sourced, not run): the torchrun launch of
# inference_qwen2vl.py with the inference JSON.  Every variable is overridable from the
# environment; arguments given to the launcher ("$@") are appended last and win (over the
# JSON too).
source "$(dirname "${BASH_SOURCE[0]}")/launcher_env.sh"

TP=${TP:-1}                      # one process per tensor-parallel rank
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29511}

DISTRIBUTED_ARGS="
    --nproc_per_node $TP \
    --nnodes 1 \
    --node_rank 0 \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# The JSON holds checkpoint, tokenizer folder and generation settings; these override it when set.
INFER_ARGS="
    --config ${INFERENCE_CONFIG} \
    --tensor-model-parallel-size ${TP} \
    ${LOAD_PATH:+--load ${LOAD_PATH}} \
    ${ITERATION:+--iteration ${ITERATION}} \
    ${MM_MODEL:+--mm-model ${MM_MODEL}} \
    ${TOKENIZER_PATH:+--tokenizer-path ${TOKENIZER_PATH}} \
    ${MAX_NEW_TOKENS:+--max-new-tokens ${MAX_NEW_TOKENS}} \
    ${DEVICE:+--device ${DEVICE}} \
"

if [ "$TP" = 1 ]; then  # one process: no launcher in between, so an input error stays one line
    python "$ROOT/inference_qwen2vl.py" $INFER_ARGS "$@"
else
    torchrun $DISTRIBUTED_ARGS "$ROOT/inference_qwen2vl.py" $INFER_ARGS "$@"
fi
