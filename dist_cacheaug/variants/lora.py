"""LoRA coprocessor (paper Table 5): the coprocessor is a frozen copy of the decoder with LoRA adapters
(peft) on every linear layer; only the adapters and the soft tokens train.

The export holds the adapters and soft tokens only: the frozen base of the coprocessor is rebuilt as a
copy of the decoder given to :meth:`from_pretrained` (the same decoder it was trained with).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.model import (
    COPROCESSOR_DIR,
    SOFT_TOKENS_NAME,
    WEIGHTS_NAME,
    CacheAugmentedLM,
    TensorFileWriter,
    as_coprocessor,
    device_of,
    read_export_meta,
    save_tensors,
)

ADAPTER_MARK = "lora_"


def linear_names(module: nn.Module) -> list[str]:
    """Names (last component) of the linear layers of a decoder-architecture base model."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})


class LoraCoprocessorLM(CacheAugmentedLM):
    variant_name = "lora"
    lora: dict

    @classmethod
    def from_decoder(
        cls,
        decoder,
        num_latents: int = 16,
        *,
        lora_rank: int = 64,
        lora_alpha: float | None = None,
        seed: int = 0,
        **kw,
    ) -> LoraCoprocessorLM:
        model = super().from_decoder(decoder, num_latents, coprocessor_init="decoder", seed=seed, **kw)
        model.add_adapters(lora_rank, lora_alpha or float(lora_rank), seed=seed)
        return model

    def add_adapters(self, rank: int, alpha: float, targets: list[str] | None = None, seed: int = 0) -> None:
        """LoRA on every linear layer of the coprocessor (B = 0: it starts as the decoder's copy); then
        only adapter weights (and the soft tokens) require grad."""
        from peft import LoraConfig, inject_adapter_in_model

        targets = list(targets or linear_names(self.coprocessor))
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.coprocessor)
        dtype, device = self.soft_tokens.dtype, self.soft_tokens.device
        for name, p in self.coprocessor.named_parameters():
            p.requires_grad_(ADAPTER_MARK in name)
            if ADAPTER_MARK in name:
                p.data = p.data.to(dtype=dtype, device=device)
        self.lora = {"rank": rank, "alpha": alpha, "target_modules": targets}

    def variant_options(self) -> dict:
        return dict(self.lora)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.coprocessor.state_dict(keep_vars=True).items() if ADAPTER_MARK in k}

    def save_pretrained(self, directory: str | Path, write_tensors: TensorFileWriter | None = None) -> None:
        write = write_tensors or save_tensors
        directory = Path(directory)
        cop_dir = directory / COPROCESSOR_DIR
        cop_dir.mkdir(parents=True, exist_ok=True)
        self.coprocessor.config.save_pretrained(cop_dir)
        write(cop_dir / WEIGHTS_NAME, self.adapter_state())
        self.save_soft_tokens(directory, write)
        self.write_meta(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, decoder) -> LoraCoprocessorLM:
        directory = Path(directory)
        meta, config = read_export_meta(directory, decoder, cls.variant_name)
        opts = meta.get("variant_options", {})
        try:
            state = load_file(str(directory / COPROCESSOR_DIR / WEIGHTS_NAME))
            soft = load_file(str(directory / SOFT_TOKENS_NAME))["soft_tokens"]
        except (OSError, KeyError) as e:
            raise ValueError(f"{directory}: cannot load the LoRA adapters or soft tokens: {e}") from e
        dtype = next(decoder.parameters()).dtype
        cop = as_coprocessor(copy.deepcopy(decoder.base_model), config).to(dtype=dtype)
        model = cls(decoder, cop, soft.to(dtype=dtype, device=device_of(decoder)), config)
        model.add_adapters(int(opts["rank"]), float(opts["alpha"]), opts.get("target_modules"))
        missing = set(model.adapter_state()) - set(state)
        extra = set(state) - set(model.adapter_state())
        if missing or extra:
            raise ValueError(
                f"{directory}: adapter weights do not match (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})"
            )
        model.coprocessor.load_state_dict(state, strict=False)
        return model
