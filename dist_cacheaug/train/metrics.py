"""Monitoring on rank 0: ``run_dir/metrics.jsonl``, TensorBoard under ``run_dir/tb``, a console line.

Other ranks get a logger whose methods do nothing. On resume, records after the checkpoint's step are
dropped from metrics.jsonl (and TensorBoard purges them), so the file reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak FLOP/s per device, matched against torch.cuda.get_device_name() in order
# (first match wins; whole words, so "L4" is not "L40S" and "A10" is not "A100"). Datasheets list bf16
# "with sparsity"; dense is half of that:
#   NVIDIA H100 datasheet: SXM 1,979 / NVL 1,671 / PCIe 1,513 TFLOPS -> 989 / 835 / 756 dense.
#     get_device_name: SXM5 boards report "NVIDIA H100 80GB HBM3" (no form factor), the others
#     "NVIDIA H100 PCIe" and "NVIDIA H100 NVL".
#   NVIDIA H200 datasheet: SXM 1,979 / NVL 1,671 TFLOPS -> 989 / 835. GH200 (Grace Hopper): 1,979 -> 989.
#   A100 / A800: 312; L40S: 362 (733 sparse); RTX A6000: 155 (310 sparse); L4: 121 (242 sparse);
#   A10: 125 (250 sparse); V100: 125 (fp16 tensor cores, no bf16).
PEAK_FLOPS: list[tuple[str, float]] = [
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3", "... SXM5 ...")
    (r"\bH200\b.*\bNVL\b", 835e12),
    (r"\b(H200|GH200)\b", 989e12),
    (r"\b(A100|A800)\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bA6000\b", 155e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bV100\b", 125e12),
]


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device called ``name`` (``torch.cuda.get_device_name``), or None."""
    for pattern, value in PEAK_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return value
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU: no meaningful peak, MFU is null)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process, or peak host RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _clean(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON: non-finite values are written as null
    return value


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        console: bool,
        max_steps: int,
        resume_step: int = 0,
    ):
        self.enabled, self.console, self.max_steps = enabled, console, max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step or self.path.exists():
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(_tb_name(k), v, step)
            self._tb.flush()
        if self.console:
            print(progress_line(step, self.max_steps, record), file=sys.stdout, flush=True)

    def tensorboard_scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars that are not a training step's (a checkpoint's size and time): TensorBoard only, so
        metrics.jsonl keeps one record per logged step."""
        if self.enabled and self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"[cacheaug] {text}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tb_name(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("loss"):
        return f"train/{key}"
    if key.startswith("straggler_"):
        return f"straggler/{key[len('straggler_') :]}"
    perf = ("tokens_per_s", "step_time", "mfu", "peak_mem_gib", "data_wait", "compute_time")
    return f"perf/{key}" if key in perf else f"train/{key}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def progress_line(step: int, max_steps: int, r: dict) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {_fmt(r.get('loss'), '.4f')}"]
    ks = [k for k in r if k.startswith("loss_k")]
    if ks:
        parts.append(" ".join(f"{k[5:]} {_fmt(r[k], '.3f')}" for k in ks))
    parts += [
        f"lr {_fmt(r.get('lr'), '.2e')}",
        f"gnorm {_fmt(r.get('grad_norm'), '.3f')}",
        f"{_fmt(r.get('tokens_per_s'), ',.0f')} tok/s",
        f"{_fmt(r.get('step_time'), '.2f')} s/step",
    ]
    if r.get("mfu") is not None:
        parts.append(f"mfu {r['mfu'] * 100:.1f}%")
    if r.get("nonfinite_skipped"):
        parts.append(f"nonfinite {r['nonfinite_skipped']}")
    if "val_loss" in r:
        parts.append(f"val {_fmt(r['val_loss'], '.4f')} (base {_fmt(r.get('val_baseline'), '.4f')})")
    return " | ".join(parts)


def machine_description() -> str:
    """One line naming the machine a figure was measured on: CPU (or GPU), cores, torch, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return f"{gpu}{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"
