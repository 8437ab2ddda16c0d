"""One thin wrapper over transformers' AutoTokenizer: chat templates, left-padded batches, stop ids."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


class Tokenizer:
    """Text <-> token ids for prompts and responses (tokenizer.json and sentencepiece models alike)."""

    def __init__(self, hf_tokenizer, extra_stop_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        stops = [hf_tokenizer.eos_token_id, *extra_stop_ids]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))
        pad = hf_tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.stop_ids[0]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def chat_prompt(self, user_text: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat, ending with the assistant's generation prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": user_text}]
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` up to (not including) the first stop id, special tokens dropped."""
        ids = list(ids)
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:i]
                break
        return self.hf.decode(ids, skip_special_tokens=True)

    def pad_left(self, sequences: Sequence[Sequence[int]], length: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Left-pads to `length` (default: the longest): ids `[B, P]` int32 and mask `[B, P]` bool."""
        return pad_left(sequences, self.pad_id, length)


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """ids `[B, P]` int32 and mask `[B, P]` bool, each sequence right-aligned (left padding)."""
    length = max(map(len, sequences)) if length is None else length
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit length {length}")
        if len(seq):
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = True
    return ids, mask


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer of an HF folder or hub id; stop ids include generation_config's eos ids."""
    # Only transformers' tokenizers are used, never its PyTorch models: its "PyTorch was not found"
    # advice would tell a user of this JAX project to install something it does not need.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer
    from sqlm_jax.models.hf import resolve_checkpoint

    folder = resolve_checkpoint(path)
    try:
        hf = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {folder}: {e}") from e
    if hf.chat_template is None:
        raise ValueError(f"the tokenizer in {folder} has no chat template; SQLM prompts need one "
                         "(use an instruct/chat checkpoint or add chat_template to tokenizer_config.json)")
    extra = []
    gen_config = Path(folder) / "generation_config.json"
    if gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return Tokenizer(hf, extra)
