"""The CLIP byte-level BPE tokenizer, producing the same ids as open_clip's `SimpleTokenizer`.

Text is cleaned (ftfy, HTML unescape twice, whitespace collapsed, lower-cased), split into words
by CLIP's pattern, each word's UTF-8 bytes mapped to printable characters and merged by the BPE
ranks of `bpe_simple_vocab_16e6.txt.gz` (the 48,894 merges of OpenAI CLIP, shipped with open_clip
under the MIT licence: `LICENSE_open_clip_bpe.txt`). Sequences are `<start_of_text> … <end_of_text>`
padded with 0 to the context length (77); longer ones are cut and end with `<end_of_text>`.
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Sequence
from importlib import resources

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"
WORD_PATTERN = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """Each byte → a printable unicode character: printable Latin-1 bytes map to themselves, the
    others to 256, 257, … in byte order. The dict's order (printable bytes first) is the order of
    the first 256 vocabulary entries."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    def __init__(self, context_length: int = 77):
        raw = resources.files("pathor1_jax.models.clip").joinpath(VOCAB_FILE).read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(byte_alphabet().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = context_length
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per process)
    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge a word (already in the byte alphabet) by rank until no known pair is left."""
        if word in (SOT, EOT):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        alphabet = byte_alphabet()
        ids = []
        for word in WORD_PATTERN.findall(clean(text)):
            mapped = word if word in (SOT, EOT) else "".join(alphabet[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """`[N, context_length]` int32 ids."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
