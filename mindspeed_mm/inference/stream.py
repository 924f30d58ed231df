"""Print an answer as it is generated, whole characters only."""
import sys

REPLACEMENT = "\ufffd"  # what a cut multi-byte UTF-8 character decodes to


class StreamPrinter:
    """Decodes the ids since the last line break and prints what is new.

    Byte-level BPE can split one character over several tokens: text ending
    in U+FFFD is held back until the rest of the character arrives.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.pending = []  # ids since the last printed line break
        self.printed = 0  # characters of decode(pending) already printed

    def push(self, token_id: int) -> None:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return
        self._write(text[self.printed:])
        if text.endswith("\n"):
            self.pending, self.printed = [], 0
        else:
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        self._write(text[self.printed:] + "\n")
        self.pending, self.printed = [], 0

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
