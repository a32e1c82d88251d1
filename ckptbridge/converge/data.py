"""Training tokens for convergence runs: a deterministic built-in corpus, or a user file.

Every run of one comparison must see the same batches in the same order (only the envelope run
changes the order, through its data seed), and a resumed run must see exactly the batches the
uninterrupted run saw after the checkpoint.  So a batch is a pure function of (data seed, step,
microbatch): windows of ``seq_len + 1`` ids cut at positions drawn from a generator seeded with
those three numbers, never from a stateful iterator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..harness.tokens import SAMPLE_TEXT, byte_ids
from ..errors import CkptBridgeError

#: The built-in corpus: the alignment sample plus a few paragraphs of plain prose, repeated.  Small
#: enough to learn within tens of steps (the loss must visibly fall), varied enough that batches differ.
BUILTIN_TEXT = SAMPLE_TEXT + " " + (
    "At the market on Thursday the baker sold forty loaves before nine, the cheese stall ran out of the "
    "blue wheel by ten, and the flower seller gave away her last tulips to a girl who had counted her coins "
    "twice. The town clock struck noon a minute late, as it had every day since the storm. "
    "In the workshop behind the station, two apprentices took apart a bicycle, cleaned every bearing, and "
    "put it back together in the wrong order; the master laughed, showed them again, and timed the third "
    "attempt at eleven minutes. Rain came in from the west after lunch and stayed until the lamps were lit."
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class TokenStream:
    """A 1-D id sequence batches are cut from, and how it was made (for the report)."""

    ids: torch.Tensor  # int64 [n]
    source: str

    def batch(self, data_seed: int, step: int, microbatch: int, micro_batch_size: int, seq_len: int) -> torch.Tensor:
        """``[micro_batch_size, seq_len + 1]`` ids: tokens are ``[:, :-1]``, labels ``[:, 1:]``."""
        n = int(self.ids.numel())
        span = seq_len + 1
        if n < span:
            raise CkptBridgeError(f"the training data has {n} tokens, fewer than one window of {span}")
        gen = torch.Generator().manual_seed(((data_seed * 1_000_003) + step) * 1_009 + microbatch)
        starts = torch.randint(0, n - span + 1, (micro_batch_size,), generator=gen)
        return torch.stack([self.ids[s : s + span] for s in starts.tolist()])

    def step_batches(self, data_seed: int, step: int, num_microbatches: int, micro_batch_size: int,
                     seq_len: int) -> list[torch.Tensor]:
        """Every microbatch of one step: what MCore trains on and what HF's step-0 loss is computed on."""
        return [self.batch(data_seed, step, mb, micro_batch_size, seq_len) for mb in range(num_microbatches)]


def _tokenizer(hf_path: Path | None):  # noqa: ANN202 - transformers' tokenizer type
    if hf_path is None or not any((Path(hf_path) / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path)


def _encode(texts: list[str], hf_path: Path | None, vocab_size: int) -> tuple[list[int], str]:
    tok = _tokenizer(hf_path)
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text) if tok is not None else byte_ids(text, vocab_size)
    how = "checkpoint tokenizer" if tok is not None else "byte-level ids (no tokenizer in the checkpoint)"
    return ids, how


def _read_jsonl(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    ids: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CkptBridgeError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("ids"), list):
            ids += [int(i) for i in row["ids"]]
        else:
            raise CkptBridgeError(f'{path}:{lineno}: each line needs {{"text": "..."}} or {{"ids": [...]}}')
    if texts and ids:
        raise CkptBridgeError(f"{path}: mixes text and ids lines; use one kind")
    return texts, ids


def load_stream(data: Path | None, hf_path: Path | None, vocab_size: int, repeat_builtin: int = 40) -> TokenStream:
    """The built-in corpus (``data=None``), a JSONL file of ``{"text"}`` or ``{"ids"}`` lines, or ``.npy`` ids."""
    if data is None:
        ids, how = _encode([BUILTIN_TEXT] * repeat_builtin, hf_path, vocab_size)
        source = f"built-in corpus ({len(BUILTIN_TEXT)} characters x {repeat_builtin}), {how}"
    elif data.suffix == ".npy":
        import numpy as np

        ids = [int(i) for i in np.load(data).reshape(-1)]
        source = f"{data} (pre-tokenized ids)"
    elif data.suffix in (".jsonl", ".json"):
        texts, ids = _read_jsonl(data)
        if texts:
            ids, how = _encode(texts, hf_path, vocab_size)
            source = f"{data} ({len(texts)} texts), {how}"
        else:
            source = f"{data} (pre-tokenized ids)"
    else:
        raise CkptBridgeError(f"{data}: training data must be .jsonl (text or ids per line) or .npy (ids)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CkptBridgeError(f"token ids {bad[:5]} are outside the vocabulary of {vocab_size}")
    return TokenStream(torch.tensor(ids, dtype=torch.long), f"{source}, {len(ids)} tokens")
