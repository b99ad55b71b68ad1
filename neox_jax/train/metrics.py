"""Run metrics: `metrics.jsonl` (one line per step, and one per validation) and TensorBoard scalars.

Only process 0 writes (`Metrics(enabled=jax.process_index() == 0)`); other processes get a writer
that does nothing, so the loop needs no process checks.  Throughput uses the project's FLOPs
formula (`neox_jax.flops`): TFLOP/s per device = train FLOPs per token x tokens/s / devices, and
MFU against the device's dense bf16 peak (`peak_flops`; unknown on CPU, so no MFU there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..flops import PEAK_FLOPS


# substrings of `jax.Device.device_kind` (lower case) -> PEAK_FLOPS key
_KINDS = (("h100", "h100"), ("h200", "h200"), ("gh200", "h200"), ("a100", "a100"), ("v5 lite", "tpu-v5e"),
          ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v4", "tpu-v4"))


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for needle, key in _KINDS:
        if needle in kind:
            return PEAK_FLOPS[key]
    return None


def _clean(v: Any) -> Any:
    """JSON-safe scalars: NaN/inf become strings (JSON has no NaN), numpy types become Python."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Metrics:
    """The TensorBoard writer is opened at the first scalar: tensorboardX's writer registers an exit
    handler that, if nothing was ever written, starts its queue's thread at interpreter exit, which
    Python 3.12 refuses (a traceback after the one-line error of a run that failed at its first
    step).  `close` is idempotent; the loop calls it on success and on every error."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self._tb_dir = run_dir / "tensorboard" if enabled and tensorboard else None
        self._tb = None

    def write(self, record: dict[str, Any], *, scalars: bool = True) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._tb_dir is not None and scalars:
            if self._tb is None:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self._tb_dir))
            prefix = "valid" if "valid_loss" in rec else "train"
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False
