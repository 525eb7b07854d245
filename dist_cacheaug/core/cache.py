"""Decoder-cache views shared by the training passes, the augmentation step and evaluation: a cheap
structural copy (:func:`clone_cache`) and a read-only view (:func:`read_only_view`)."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def clone_cache(cache: DynamicCache) -> DynamicCache:
    """A cache that shares the tensors but not the structure. Layers rebind (torch.cat) rather than
    write in place on update, so appending to the clone leaves the original untouched."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


class ReadOnlyLayer(DynamicLayer):
    """A cache layer that returns prefix + new keys but never stores them. The extended passes only read
    the prefix, and a layer recomputed by activation checkpointing then sees the very same prefix."""

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_view(cache: DynamicCache) -> DynamicCache:
    """The same prefix keys/values (no copy) behind layers that never grow; ``view.read_only`` is True
    (activation checkpointing recomputes a layer only under such a cache, see ``checkpoint_layers``)."""
    view = copy.copy(cache)
    layers = []
    for layer in cache.layers:
        ro = ReadOnlyLayer.__new__(ReadOnlyLayer)
        ro.__dict__.update(layer.__dict__)
        layers.append(ro)
    view.layers = layers
    view.read_only = True
    return view
