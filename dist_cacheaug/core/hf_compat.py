"""The one place that knows which keyword the installed transformers takes for a kv-cache.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` at every level (models, decoder layers,
attention modules); the old name still works at the model level, warns on every call, and is removed in
5.40. Earlier 5.x releases accept only ``past_key_values=``. Call sites write
``model(input_ids=x, **cache_arg(cache))`` and decoder-layer wrappers read ``layer_cache(kwargs)``.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# Detected from a model's signature rather than a version number: the rename is what matters, and a
# signature cannot be wrong about it.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_arg(cache) -> dict:
    """Keyword arguments that hand ``cache`` to an HF model under the installed name."""
    return {CACHE_KEYWORD: cache}


def layer_cache(kwargs: dict):
    """The cache a decoder layer was called with, whichever name the caller used (or None)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
