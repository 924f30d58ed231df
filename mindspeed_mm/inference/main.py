"""inference_qwen2vl.py: check everything, load the checkpoint, then chat or run a file.

    python inference_qwen2vl.py --load CKPT --tokenizer-path HF_DIR --image a.jpg --prompt "Describe it."
    torchrun --nproc_per_node 2 inference_qwen2vl.py --tensor-model-parallel-size 2 --load CKPT \
        --tokenizer-path HF_DIR --input eval.json --output answers.jsonl

Inputs (tokenizer, model config, images, prompt lengths, checkpoint layout)
are all checked before the model is built, so a mistake costs seconds and
prints one line.

Imports megatron-core: inference_qwen2vl.py sets up the platform first.
"""
import os
from contextlib import contextmanager

import torch

from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.arguments import InferenceArgs, parse_args
from mindspeed_mm.inference.batch import run_batch
from mindspeed_mm.inference.chat import run_chat
from mindspeed_mm.inference.generate import Generator
from mindspeed_mm.inference.loading import (check_tokenizer, load_model, load_model_config, load_processors,
                                            model_source, open_checkpoint, stop_token_ids)
from mindspeed_mm.inference.prompts import PromptBuilder, chat_conversation, read_conversations
from mindspeed_mm.platform import setup_platform
from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed


def prepare(args: InferenceArgs):
    """(tokenizer, model config, prompt builder, prompts, stop ids, checkpoint state): no model, no processes yet.
    The checkpoint's rank files are memory-mapped and checked against the model config, not read."""
    tokenizer, image_processor = load_processors(args.tokenizer_path, args.min_pixels, args.max_pixels)
    source = model_source(args.load, args.mm_model)
    cfg = load_model_config(args.load, args.mm_model, args.params_dtype)
    cfg.check_parallel(args.tensor_model_parallel_size)
    check_tokenizer(cfg, tokenizer, source, args.tokenizer_path)
    stop_ids = stop_token_ids(args.generation, tokenizer, cfg, args.tokenizer_path)
    state = open_checkpoint(cfg, args.load, args.iteration, source)  # there, complete, and of this architecture
    builder = PromptBuilder(tokenizer, image_processor, cfg.text.max_position_embeddings, args.video_settings())
    if args.single:
        where = "/".join(["--image"] * bool(args.image) + ["--video"] * bool(args.video) + ["--prompt"])
        prompts = [builder.build(chat_conversation(args.prompt, args.image or [], args.system, args.video or []),
                                 where)]
    else:
        prompts = [builder.build(conv, f"{args.input}: sample {i}", reference)
                   for i, (conv, reference) in enumerate(read_conversations(args.input))]
    return tokenizer, cfg, builder, prompts, stop_ids, state


@contextmanager
def distributed(device, tensor_parallel: int, seed: int):
    """Processes for TP (the world is exactly the TP group); torn down only if set up here."""
    platform = setup_platform(device)  # already set up by inference_qwen2vl.py: the same one
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != tensor_parallel:
        raise UserError(f"--tensor-model-parallel-size {tensor_parallel}: inference runs on exactly that many "
                        f"processes, launched with {world} (torchrun --nproc_per_node {tensor_parallel})")
    owned = not torch.distributed.is_initialized()
    init_distributed(platform, tensor_parallel, 1, seed)
    try:
        yield torch.distributed.get_rank() == 0
    finally:
        if owned:
            destroy_distributed()


def main(argv=None):
    return run(parse_args(argv))


def run(args: InferenceArgs):
    tokenizer, cfg, builder, prompts, stop_ids, state = prepare(args)
    tp = args.tensor_model_parallel_size
    with distributed(args.device, tp, args.generation.seed) as is_writer:
        model = load_model(cfg, state, tp)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
        generator = Generator(model, cfg, args.generation, stop_ids, pad_id)
        if args.single:
            return run_chat(generator, builder, prompts[0], tokenizer, args.output_json, args.stream, is_writer)
        run_batch(generator, builder, prompts, tokenizer, args.output, args.batch_size, is_writer)
        return None
