"""Tokenizers: training a sentencepiece model, and one small wrapper over sentencepiece / HF tokenizers.

``load_tokenizer(path)`` accepts a sentencepiece ``.model`` file, a directory written by
``train-tokenizer`` (``tokenizer.model`` + ``tokenizer_meta.json``), or a Hugging Face tokenizer directory
(anything ``AutoTokenizer.from_pretrained`` loads locally). ``.identity`` is ``kind:sha256`` of the
model file(s); shard manifests record it so a trainer can refuse shards made with another tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator

from .errors import DataError

SPM_MODEL_NAME = "tokenizer.model"
SPM_META_NAME = "tokenizer_meta.json"  # not "tokenizer.json": that name is HF's fast-tokenizer file
SPM_META_FORMAT = "dist_cacheaug.sentencepiece"
# Gemma's convention for the reserved ids.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# HF files that define a tokenizer; their hashes make up an HF tokenizer's identity.
_HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Minimal tokenizer interface used by the data tools and the trainer."""

    kind: str
    identity: str
    path: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def piece_id(self, piece: str) -> int | None:
        """The id of the vocabulary entry spelled exactly ``piece``, or None if there is none."""
        raise NotImplementedError

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(path={self.path!r}, vocab_size={self.vocab_size}, identity={self.identity!r})"


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str, display_path: str | None = None):
        import sentencepiece as spm

        self.path = display_path or model_file
        self.model_file = model_file
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot load sentencepiece model {model_file!r}: {e}") from e
        self.identity = f"sentencepiece:{sha256_file(model_file)}"
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id, self.bos_id, self.pad_id, self.unk_id = (
            (None if i < 0 else int(i))
            for i in (self.sp.eos_id(), self.sp.bos_id(), self.sp.pad_id(), self.sp.unk_id())
        )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        # A model's embedding table may be larger than the tokenizer (padded vocabularies); ids past
        # the tokenizer's range decode as unk instead of failing inside sentencepiece.
        n, unk = self.vocab_size, self.sp.unk_id()
        return self.sp.decode([int(i) if 0 <= int(i) < n else unk for i in ids])

    def piece_id(self, piece: str) -> int | None:
        i = int(self.sp.piece_to_id(piece))
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def __getstate__(self):  # picklable for multiprocessing: reload from the file
        return {"model_file": self.model_file, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_file"], state["path"])


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, directory: str):
        try:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # transformers raises many types here
            raise DataError(f"cannot load HF tokenizer from {directory!r}: {e}") from e
        self.path = directory
        h = hashlib.sha256()
        for name in _HF_FILES:
            p = os.path.join(directory, name)
            if os.path.isfile(p):
                h.update(f"{name}:{sha256_file(p)}\n".encode())
        self.identity = f"hf:{h.hexdigest()}"
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id
        self.pad_id = self.tok.pad_token_id
        self.unk_id = self.tok.unk_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        return self.tok.get_vocab().get(piece)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece ``.model`` file, a ``train-tokenizer`` output dir, or an HF tokenizer dir."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    if not os.path.isdir(path):
        raise DataError(f"tokenizer {path!r} does not exist (expected a .model file or a directory)")
    spm_model = os.path.join(path, SPM_MODEL_NAME)
    ours = os.path.isfile(os.path.join(path, SPM_META_NAME))
    hf = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
    if os.path.isfile(spm_model) and (ours or not hf):
        return SentencePieceTokenizer(spm_model, display_path=path)
    if hf:
        return HFTokenizer(path)
    raise DataError(
        f"tokenizer directory {path!r} has neither {SPM_MODEL_NAME} nor an HF tokenizer "
        "(tokenizer.json / tokenizer_config.json)"
    )


def _sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """sentencepiece trains on lines; long lines are cut into pieces it will not drop."""
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                cut = max_bytes // 4  # characters are at most 4 bytes
                yield line[:cut]
                line = line[cut:]
            yield line


def train_tokenizer(
    docs: Iterable[str],
    out_dir: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    special_tokens: list[str] | None = None,
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    seed: int = 0,
    num_threads: int | None = None,
    inputs: list[str] | None = None,
    verbose: bool = False,
    split_digits: bool = False,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model; writes ``out_dir/tokenizer.model`` and ``tokenizer_meta.json``.

    Identity normalization and no whitespace collapsing, so ``decode(encode(text)) == text`` for text
    the model covers; ``"\\n"`` is a user-defined symbol (documents keep their line breaks even without
    byte fallback). Ids: pad=0, eos=1, bos=2, unk=3. ``split_digits``: every digit is its own piece
    (numbers are read and written digit by digit, as arithmetic wants).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type must be bpe or unigram, not {model_type!r}")
    if vocab_size < 8:
        raise DataError(f"--vocab-size {vocab_size} is too small")
    specials = ["\n"] + [t for t in (special_tokens or []) if t != "\n"]
    max_bytes = 8192
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    n_sentences = 0

    def counted(it):
        nonlocal n_sentences
        for s in it:
            n_sentences += 1
            yield s

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(_sentences(docs, max_bytes)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            user_defined_symbols=specials,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=character_coverage,
            split_digits=split_digits,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_bytes,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        if n_sentences == 0:
            raise DataError("tokenizer training corpus is empty (no non-blank lines)") from e
        raise DataError(f"sentencepiece training failed: {e}") from e
    model_path = os.path.join(out_dir, SPM_MODEL_NAME)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    tok = SentencePieceTokenizer(model_path, display_path=out_dir)
    meta = {
        "format": SPM_META_FORMAT,
        "model_file": SPM_MODEL_NAME,
        "sha256": tok.identity.split(":", 1)[1],
        "identity": tok.identity,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "unk_id": tok.unk_id,
        "model_type": model_type,
        "byte_fallback": byte_fallback,
        "special_tokens": specials,
        "character_coverage": character_coverage,
        "split_digits": split_digits,
        "seed": seed,
        "training_sentences": n_sentences,
        "inputs": list(inputs or []),
    }
    meta_path = os.path.join(out_dir, SPM_META_NAME)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(meta_path + ".tmp", meta_path)
    return tok
