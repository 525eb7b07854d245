"""The method: the cache-augmented model, its masks and losses, building the frozen decoder, and the one
augmentation step and decode loop. Imports only ``dist_cacheaug.config`` from outside this package;
knows nothing of DeepSpeed, data loading, evaluation or SLURM.

Modules, each importing only those above it: ``hf_compat``, ``masks``, ``losses``, ``cache`` (cache
views), ``augment`` (the augmentation step), ``generation`` (the decode loop), ``model``
(``CacheAugmentedLM``: training passes, ``augment``/``generate`` delegating to the two above),
``decoder`` (building the frozen decoder).

Extension API for variants (``dist_cacheaug/variants``: subclass ``CacheAugmentedLM`` and override what
differs; the trainer, validation, evaluation, generation and export then work unchanged):

Methods of ``CacheAugmentedLM`` to override or call (``model.py``):

* ``training_loss(input_ids, positions, num_ahead)``: the three passes below; rarely overridden.
* ``prefix_pass(input_ids)``: (1) (full-layer decoder cache, last hidden states) of the sequence.
* ``trace_latents(input_ids, positions, cache, prefix_hidden, view_end=None)``: (2) [B, P, N_L, H]
  latents of every trace; override to change what writes the latents.
* ``trace_loss(input_ids, positions, latents_bpld, cache, num_ahead)``: (3) the decoder's trace pass and
  CE per ahead offset.
* ``token_ce(hidden_mh, targets_m)``: per-row CE through the LM head (chunked, head weight read directly).
* ``coprocessor_states(inputs_bqh, cache, attention_mask=None, position_ids=None)``: the coprocessor's
  hidden states over inputs appended to a cache.
* ``coprocessor_layout(positions, view_end, prefix_len)``: the soft tokens' ``TraceLayout``.
* ``latents_for_prompt(input_ids, cache)`` / ``latents_for_cache(cache, batch)``: [B, N_L, H] latents at
  inference; the augmentation step calls ``latents_for_prompt``.
* ``augment(input_ids)`` / ``generate(...)``: the shared step and decode loop; ``async_delay`` (class
  attribute) makes the latents lag.
* ``variant_options()`` / ``apply_variant_options(options)``: variant settings saved in the export.
* ``save_soft_tokens(directory)``, ``write_meta(directory)``: the export's soft tokens and
  ``cacheaug_config.json``; ``enable_activation_checkpointing()``; ``baseline_decoder``.

Functions:

* ``model``: ``check_positions`` (validated [B, P] positions), ``checkpoint_layers`` (recompute layers in
  backward, cache-safe), ``device_of``, ``as_coprocessor`` (a base model as the coprocessor),
  ``init_soft_tokens``, ``read_export_meta`` (an export's meta and ``AugmentConfig``, checked),
  ``decoder_fingerprint``, ``frozen_prefix_pass``, ``trace_pass`` (the decoder's batched trace pass),
  ``no_latent_trace_loss``, ``attn_implementation_of``; ``AugmentConfig``, ``TrainingLossOutput`` and
  the export file names ``CONFIG_NAME``, ``COPROCESSOR_DIR``, ``WEIGHTS_NAME``, ``SOFT_TOKENS_NAME``.
* ``augment``: ``AugmentOutput``, ``check_prompt``, ``CleanCache`` (the latent-free cache, advanced
  lazily), ``augment_at`` (one augmentation at a length, optionally delayed), ``augment_prompt``,
  ``read_prompt`` (no augmentation), ``latent_inputs`` (a step up to the decoder's pass over the
  latents, which generation hands to HF ``generate``); for left-padded batches every one of these
  takes an ``attention_mask`` ([B, L], 1 = token), checked by ``check_attention_mask``, with per-row
  positions from ``mask_positions``.
* ``cache``: ``clone_cache`` (cheap structural copy), ``read_only_view`` (a prefix that never grows).
* ``hf_compat.cache_arg`` (the cache keyword of this transformers version), ``masks.TraceLayout`` /
  ``attention_masks``, ``losses.chunked_cross_entropy`` / ``lm_head_of``.
"""
