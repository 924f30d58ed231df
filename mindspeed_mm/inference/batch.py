"""A whole MLLM-format file: one JSONL line per sample, written under a temporary name, then renamed."""
import json
from contextlib import contextmanager
from typing import List

from mindspeed_mm.inference.generate import Generator
from mindspeed_mm.jsonio import atomic_open
from mindspeed_mm.inference.prompts import Prompt, PromptBuilder


@contextmanager
def jsonl_writer(path: str, enabled: bool = True):
    """Yields write(obj); the file appears at ``path`` only when every line is written."""
    if not enabled:
        yield lambda obj: None
        return
    with atomic_open(path, "w", suffix=".jsonl") as f:  # mode from the umask, like a plain open()
        yield lambda obj: f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def run_batch(generator: Generator, builder: PromptBuilder, prompts: List[Prompt], tokenizer, output: str,
              batch_size: int = 1, is_writer: bool = True) -> None:
    from tqdm import tqdm

    with jsonl_writer(output, is_writer) as write, \
            tqdm(total=len(prompts), unit="sample", desc="inference", disable=not is_writer) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            answers = generator.generate(builder.batch(chunk))
            for i, (prompt, token_ids) in enumerate(zip(chunk, answers)):
                write({"index": start + i, "prompt": prompt.text,
                       "response": tokenizer.decode(token_ids, skip_special_tokens=True),
                       "reference": prompt.reference, "token_ids": token_ids})
            bar.update(len(chunk))
