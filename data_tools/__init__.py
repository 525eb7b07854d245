"""Corpus tools: sentencepiece training, tokenized/packed webdataset shards, inspection, verification.

CLI: ``python -m data_tools {train-tokenizer,make-shards,merge-shards,inspect,verify} ...``.
"""

from .errors import DataError
from .make import make_shards
from .parts import merge_parts
from .shards import inspect_shards, read_manifest, read_shard, verify_shards, write_token_shards
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "Tokenizer",
    "inspect_shards",
    "load_tokenizer",
    "make_shards",
    "merge_parts",
    "read_manifest",
    "read_shard",
    "train_tokenizer",
    "verify_shards",
    "write_token_shards",
]
