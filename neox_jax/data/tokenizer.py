"""Tokenizers: the GPT-NeoX BPE (HF `tokenizers` JSON) and sentencepiece models, one interface.

`load_tokenizer(path)` picks by content: a `.json` file is an HF `tokenizers` file (such as
`../shared/data/20B_tokenizer.json`), a `.model` file a sentencepiece model.  Both encode without
adding BOS/EOS (GPT-NeoX appends EOD = id 0 itself when asked)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError, reading


def shared_dir() -> Path:
    """The shared data/reference folder: $NEOX_JAX_SHARED, else ../shared beside the repository."""
    env = os.environ.get("NEOX_JAX_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared"


def default_tokenizer_path() -> Path:
    return shared_dir() / "data" / "20B_tokenizer.json"


@dataclass
class Tokenizer:
    path: str
    kind: str  # "hf" or "sentencepiece"
    _tok: object
    eod_id: int
    has_eod: bool = True  # False when eod_id is only the fallback 0 (no EOD token in the vocabulary)

    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode several texts.  `add_special_tokens=True` runs an HF tokenizer's post-processor
        (what GPT-NeoX's preprocessing does; a no-op for the 20B tokenizer); sentencepiece ignores it."""
        if self.kind == "hf":
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self._tok.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    p = Path(path) if path is not None else default_tokenizer_path()
    if not p.exists():
        raise UserError(f"{p}: tokenizer file not found")
    if p.suffix == ".model":
        import sentencepiece as spm

        with reading(p, "not a sentencepiece model"):  # RuntimeError/OSError variants
            sp = spm.SentencePieceProcessor(model_file=str(p))
        # GPT-NeoX's SentencePieceTokenizer uses the "<|endoftext|>" piece as EOD; else the model's eos
        eod = sp.piece_to_id("<|endoftext|>")
        if sp.id_to_piece(eod) != "<|endoftext|>":
            eod = sp.eos_id()
        return Tokenizer(str(p), "sentencepiece", sp, max(eod, 0), has_eod=eod >= 0)
    from tokenizers import Tokenizer as HFTokenizer

    with reading(p, "not a Hugging Face tokenizers JSON file"):  # a bare Exception on malformed JSON
        tok = HFTokenizer.from_file(str(p))
    eod = tok.token_to_id("<|endoftext|>")
    return Tokenizer(str(p), "hf", tok, 0 if eod is None else eod, has_eod=eod is not None)
