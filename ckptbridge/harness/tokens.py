"""The token ids both models run on: a built-in text sample, ``--prompt`` or explicit ``--tokens``.

Text goes through the checkpoint's own tokenizer when the HF folder has one.  Random-init models
have none; their ids come from a fixed byte-level mapping (UTF-8 byte ``c`` -> id ``3 + c``, folded
into the vocabulary), which is deterministic and exercises a spread of embedding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CkptBridgeError

SAMPLE_TEXT = (
    "The lighthouse keeper climbed the spiral stairs at dusk, counting each of the one hundred and "
    "twelve steps as his father had taught him. Below, the harbour filled with fishing boats returning "
    "against the tide; their engines coughed, gulls wheeled over the nets, and somebody on the quay was "
    "singing an old song about the winter of 1953, when the sea froze as far as the second buoy. He lit "
    "the lamp, wound the clockwork that turned the lens, and wrote in the log: wind north-east, force "
    "five, visibility good, three vessels sighted, all accounted for. Then he made tea, sat by the "
    "window, and watched the beam sweep across the water every eleven seconds until morning."
)
DEFAULT_SEQ_LEN = 64
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass
class TokenSample:
    ids: torch.Tensor  # [1, s] int64
    source: str  # how they were made, for the report


def byte_ids(text: str, vocab_size: int) -> list[int]:
    """Tokenizer-free ids: byte ``c`` -> ``3 + c`` (mod the vocabulary, skipping ids 0-2)."""
    span = max(1, vocab_size - 3)
    return [3 + (c % span) for c in text.encode("utf-8")]


def parse_token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CkptBridgeError(f"--tokens wants integers separated by commas or spaces, got {text!r}") from None


def make_tokens(hf_path: Path, vocab_size: int, prompt: str | None = None, tokens: str | None = None,
                seq_len: int | None = None) -> TokenSample:
    """Token ids for the run; ``seq_len`` truncates (default: the built-in sample is cut to 64)."""
    if tokens is not None and prompt is not None:
        raise CkptBridgeError("give --prompt or --tokens, not both")
    if tokens is not None:
        ids, source = parse_token_list(tokens), "--tokens"
    else:
        text = prompt if prompt is not None else SAMPLE_TEXT
        what = "--prompt" if prompt is not None else "built-in text sample"
        if any((Path(hf_path) / f).exists() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(hf_path).encode(text)
            source = f"{what}, checkpoint tokenizer"
        else:
            ids = byte_ids(text, vocab_size)
            source = f"{what}, byte-level ids (no tokenizer in the checkpoint)"
        if seq_len is None and prompt is None:
            seq_len = DEFAULT_SEQ_LEN
    if seq_len is not None:
        ids = ids[:seq_len]
    if len(ids) < 2:
        raise CkptBridgeError("need at least 2 tokens (the loss is over next-token predictions)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CkptBridgeError(f"token ids {bad[:5]} are outside the vocabulary of {vocab_size}")
    return TokenSample(torch.tensor([ids], dtype=torch.long), f"{source}, {len(ids)} tokens")
