"""One conversation: the answer streams to the terminal; optionally saved as JSON."""
import sys
from typing import Optional

from mindspeed_mm.jsonio import write_json_atomic
from mindspeed_mm.inference.generate import Generator
from mindspeed_mm.inference.prompts import Prompt, PromptBuilder
from mindspeed_mm.inference.stream import StreamPrinter


def run_chat(generator: Generator, builder: PromptBuilder, prompt: Prompt, tokenizer,
             output_json: Optional[str] = None, stream: bool = True, is_writer: bool = True) -> dict:
    """Returns {'response', 'token_ids'} (generated ids, prompt excluded, stop id included if produced)."""
    printer = StreamPrinter(tokenizer) if stream and is_writer else None
    on_tokens = (lambda tokens, finished: printer.push(tokens[0])) if printer else None
    (token_ids,) = generator.generate(builder.batch([prompt]), on_tokens=on_tokens)
    result = {"response": tokenizer.decode(token_ids, skip_special_tokens=True), "token_ids": token_ids}
    if is_writer:
        if printer:
            printer.end()
        else:
            print(result["response"], flush=True)
        stats = generator.stats
        speed = f", decode {stats.decode_tokens_per_second:.1f} tokens/s" if stats.new_tokens > 1 else ""
        print(f"[{len(token_ids)} new tokens after a {len(prompt.input_ids)}-token prompt; prefill "
              f"{stats.prefill_seconds:.2f}s{speed}]", file=sys.stderr)
        if output_json:
            write_json_atomic(output_json, result)
    return result
