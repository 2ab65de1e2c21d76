"""GPT-2's byte-pair encoding through tiktoken, and text streams that never split a character."""

from __future__ import annotations

import codecs
import functools

import tiktoken

# tiktoken's `r50k_base` has exactly the ranks of its `gpt2` encoding; loading it by this name lets an
# offline cache (TIKTOKEN_CACHE_DIR) serve it.
ENCODING_NAME = "r50k_base"
EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"


class Tokenizer:
    """GPT-2 BPE. User text is encoded as plain text: a literal "<|endoftext|>" in a prompt is not EOT."""

    def __init__(self, name: str = ENCODING_NAME):
        self.name = name
        self._encoding = _load(name)
        self.eot_token = self._encoding.eot_token
        self.vocab_size = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, tokens: list[int]) -> str:
        return self._encoding.decode(tokens, errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


class TextStream:
    """One request's generated tokens as text deltas.

    Bytes of a character split over tokens are held back until the character is complete, and so is
    any tail that could still grow into a stop string: the deltas joined always equal the final text,
    so a streamed response and a non-streamed one agree.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text it releases. Sets `stopped` when a stop string completes."""
        self._pending += self._decoder.decode(self._tokenizer.token_bytes(token))
        return self._release()

    def finish(self) -> str:
        """Release whatever is held back; an incomplete trailing character becomes U+FFFD."""
        self._pending += self._decoder.decode(b"", final=True)
        text = self._release()
        text, self._pending = text + self._pending, ""
        return text

    def _release(self) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            text, self._pending = self._pending[: min(hits)], ""
            self.stopped = True
            return text
        keep = self._partial_stop_length()
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best
