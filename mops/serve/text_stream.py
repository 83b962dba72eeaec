"""A request's text as its tokens arrive: incremental detokenization and stop strings.

Tokens are turned into text by the tokenizers library's ``DecodeStream`` (what
``transformers serve`` streams with): a token that ends inside a multi-byte character
waits for the next one. Stop strings follow OpenAI's rule: the output ends right before
the first stop string and does not contain it. Text that could still become the start of
a stop string is held back until the next token decides, so a streamed client never sees
a piece of a stop string either.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer.backend_tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = tuple(s for s in stop if s)
        self.text = ""
        self._sent = 0  # text[:_sent] has been handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text that is now safe to hand out, and whether a stop string ended the output."""
        piece = self._decoder.step(self._tokenizer, token_id)
        if piece:
            self.text += piece
        # A stop string cannot start before _sent: whatever could begin one was held back.
        hits = [i for i in (self.text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """Everything not handed out yet (the output ended for another reason than a stop string)."""
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text) - self._sent), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _take(self, end: int) -> str:
        out = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
