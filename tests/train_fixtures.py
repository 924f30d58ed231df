"""End-to-end training fixtures: a tiny random HF Qwen2-VL converted with the project's
converter, a drawn-shapes image dataset in MLLM format, and helpers to launch
``pretrain_qwen2vl.py`` (through torchrun or the guide's launcher) and read its log."""
import json
import os
import re
import subprocess
import sys
import time

from tests.data_fixtures import MAX_PIXELS, MIN_PIXELS, data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([-+0-9.naninfE]+) \|")


def make_hf_model(path: str, seed: int = 0) -> str:
    """Tokenizer, image processor and random weights of a tiny Qwen2-VL (2 LLM layers, 4 query heads
    over 2 KV heads, non-uniform M-RoPE sections, a vocabulary that megatron pads at TP=2)."""
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    make_tiny_qwen2vl(path, seed=seed, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                      hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                      vision_config=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2))
    return path


def small_pair(folder: str, flags_of, vit_layers: int = 1, vit_heads: int = 2, samples: int = 2):
    """(collated batch, HF model, config, DDP model, optimizer, scheduler): scripts/bench_train's random
    Qwen2-VL at LLM 2 x 128, ViT ``vit_layers`` x 64, and our training stack from ``flags_of(model_json)``
    with the same weights, on ``samples`` drawn conversations with images.  Call after init_distributed."""
    import argparse

    from scripts.bench_train import add_model_args, build_same_weights, make_batch

    ap = argparse.ArgumentParser()
    add_model_args(ap)
    args = ap.parse_args(["--layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--heads", "4",
                          "--kv-heads", "2", "--vit-layers", str(vit_layers), "--vit-hidden-size", "64",
                          "--vit-heads", str(vit_heads)])
    tokenizer, batch = make_batch(folder, samples, 56 * 56, 112 * 112)
    return (batch, *build_same_weights(folder, tokenizer, args, flags_of))


def convert(hf_dir: str, save_dir: str, tp: int, stage_layers) -> str:
    from checkpoint.convert import convert_hf_to_mm

    convert_hf_to_mm(hf_dir, save_dir, tensor_parallel_size=tp, pipeline_num_layers=list(stage_layers),
                     progress=False)
    return save_dir


def make_data(root: str, hf_dir: str, num_images: int = 8, shuffle: bool = False) -> str:
    """Draw the images, convert LLaVA -> MLLM format with the project's converter, write data.json."""
    from mindspeed_mm.data.llava import convert_file
    from scripts.make_tiny_dataset import make_tiny_dataset

    llava = make_tiny_dataset(os.path.join(root, "images"), num_images=num_images)
    mllm = os.path.join(root, "mllm.json")
    convert_file(llava, os.path.join(root, "images", "train2017"), mllm, log=lambda *_: None)
    config = data_config(hf_dir, mllm, os.path.join(root, "cache"), dataset_dir=root)
    config["dataloader_param"].update(batch_size=1, shuffle=shuffle, drop_last=True)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def train_flags(data_json, model_json, *, iters, gbs=2, mbs=1, tp=1, pp=1, lr=1e-3, extra=()):
    return ["--mm-data", data_json, "--mm-model", model_json, "--device", "cpu", "--fp32",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--variable-seq-lengths",
            "--train-iters", str(iters), "--lr", str(lr), "--lr-decay-style", "cosine", "--lr-decay-iters", "10",
            "--lr-warmup-iters", "1", "--min-lr", "1e-5", "--weight-decay", "0.01", "--clip-grad", "1.0",
            "--seed", "42", "--log-interval", "1", *extra]


def env(nprocs=1):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             OMP_NUM_THREADS="1", MM_DEVICE="cpu", PYTHONWARNINGS="ignore")
    return e


def torchrun_cmd(nprocs, flags):
    from tests.multiproc import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "pretrain_qwen2vl.py"), *flags]


def run_training(flags, nprocs=1, timeout=300, check=True):
    """Run pretrain_qwen2vl.py on nprocs gloo processes; returns (returncode, combined output)."""
    proc = subprocess.run(torchrun_cmd(nprocs, flags), env=env(nprocs), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (rc={proc.returncode}):\n{out[-6000:]}")
    return proc.returncode, out


def wait_for_line(proc, needle: str, timeout: float = 240) -> str:
    """Read proc.stdout until a line contains needle; returns what was read (kills proc on failure)."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n{''.join(seen)[-4000:]}")


def losses(output: str) -> dict:
    """{iteration: lm loss} from the progress lines."""
    return {int(m.group(1)): float(m.group(3)) for m in LOSS_LINE.finditer(output)}


def hf_loss_on_first_samples(hf_dir: str, data_json: str, n: int = 2) -> float:
    """The HF model's loss on the first n samples the data pipeline yields, as one padded batch."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mindspeed_mm.data.builder import build_train_valid_datasets
    from mindspeed_mm.data.collate import Qwen2VLCollator
    from mindspeed_mm.data.config import load_data_config

    dataset, _ = build_train_valid_datasets(load_data_config(data_json), progress=False, log=lambda *_: None)
    batch = Qwen2VLCollator(dataset.pad_token_id)([dataset[i] for i in range(n)])
    model = Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=batch["mm_token_type_ids"],
                    labels=batch["labels"])
    return float(out.loss)
