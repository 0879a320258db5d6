"""The twin's local tokenizer: a byte-level BPE trained offline on a generated corpus, saved as a
Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` with a chat template)
so both the twin and inference-perf load it with no hub access.

It is built deterministically on first use into ``$ROOFLAB_CACHE/tokenizer`` (default
``~/.cache/rooflab/tokenizer``). Generated output text is a sequence of space-led whole-word tokens,
so it tokenizes back to exactly the reported number of tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB_SIZE = 4096
SPECIAL = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "gu", "zo", "ri", "fa", "te", "no", "bi",
              "ce", "ju", "wa", "xe", "qu", "ho", "sy"]


def cache_dir() -> Path:
    return Path(os.environ.get("ROOFLAB_CACHE", Path.home() / ".cache" / "rooflab"))


def _corpus(n_lines: int = 4000, seed: int = 7) -> Iterator[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(_SYLLABLES, rng.integers(1, 4))) for _ in range(6000)]
    for _ in range(n_lines):
        yield " ".join(rng.choice(words, rng.integers(5, 30))) + ". " + " ".join(
            str(x) for x in rng.integers(0, 1000, 3))


def ensure_tokenizer(path: str | Path | None = None) -> Path:
    """Return a directory holding the tokenizer, training and saving it atomically if missing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path) if path else cache_dir() / "tokenizer"
    if (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tokenizer-"))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 1_000_000, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, indent=1))
    (tmp / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "pad_token": "<pad>"}))
    try:
        tmp.rename(path)
    except OSError:  # another process won the race: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


class TwinTokenizer:
    """Counting prompts and producing output text of an exact token count."""

    def __init__(self, path: str | Path | None = None):
        from tokenizers import Tokenizer

        self.path = ensure_tokenizer(path)
        self.tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        vocab = self.tok.get_vocab()
        # whole-word tokens led by a space ("Ġword"): any sequence of them re-tokenizes one-to-one
        words = sorted(t for t in vocab if t.startswith("Ġ") and len(t) > 2 and t[1:].isalpha())
        self.words = [self.tok.decode([vocab[w]]) for w in words]

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def chat_prompt(self, messages: list[dict]) -> str:
        parts = [f"<s>{m.get('role', 'user')}: {_content(m.get('content'))}</s>" for m in messages]
        return "".join(parts) + "<s>assistant:"

    def output_tokens(self, rng: np.random.Generator, n: int) -> list[str]:
        """n token strings; their concatenation encodes to exactly n tokens."""
        idx = rng.integers(0, len(self.words), n)
        return [self.words[i] for i in idx]


def _content(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


@lru_cache(maxsize=4)
def get_tokenizer(path: str | None = None) -> TwinTokenizer:
    return TwinTokenizer(path)
