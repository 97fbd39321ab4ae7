"""The float32 range rule: deltas are built in fp32, so every strength and scale must fit in it.

Torch-free, so the command line can check a `--lora SOURCE:SCALE` strength without importing torch.
"""

from __future__ import annotations

import math

#: torch.finfo(torch.float32).max
FP32_MAX = 3.4028234663852886e38


def fits_fp32(value: float) -> bool:
    """True for a finite number whose magnitude float32 can hold (beyond it every delta overflows)."""
    return math.isfinite(value) and abs(value) <= FP32_MAX
