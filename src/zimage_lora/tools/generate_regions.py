"""`generate --region`: which adapter acts where, from the command line's "N=x0,y0,x1,y1" (a box in
fractions of the image) or "N=mask.png" (a grayscale image: white, the adapter acts; black, it does
not), checked before the pipeline loads. The masks then go to `zimage_lora.regional_adapters`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..apply.regional import check_caption, token_weights
from ..errors import InvalidArgumentError


def parse_regions(regions: Mapping[int, Any] | Sequence[str], n_loras: int, mode: str) -> dict[int, Any]:
    """{adapter position from 1: box or mask} from a mapping or "N=x0,y0,x1,y1" / "N=mask.png" texts,
    checked against the adapters given and the mode before anything loads."""
    if mode != "dynamic":
        raise InvalidArgumentError("--region needs --mode dynamic: a merged adapter is in the weights of every token.")
    items = list(regions.items()) if isinstance(regions, Mapping) else [_region_text(t) for t in regions]
    out: dict[int, Any] = {}
    for index, mask in items:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= n_loras:
            raise InvalidArgumentError(f"--region {index}=...: the number is an adapter's position among the "
                                       f"--lora options, 1 to {n_loras}")
        if index in out:
            raise InvalidArgumentError(f"--region {index}=... is given twice; one region per adapter")
        token_weights(mask, (2, 2))  # shape and range checked now, not after the pipeline loaded
        out[index] = mask
    return out


def _region_text(text: str) -> tuple[int, Any]:
    position, sep, where = text.partition("=")
    if not sep or not position.strip().isdigit():
        raise InvalidArgumentError(f"--region '{text}': expected N=x0,y0,x1,y1 (fractions of the image) or "
                                   "N=mask.png, N the adapter's position among the --lora options (from 1)")
    index, where = int(position), where.strip()
    parts = where.split(",")
    if len(parts) == 4:
        try:
            return index, tuple(float(v) for v in parts)
        except ValueError:
            pass
    path = Path(where)
    if not path.is_file():
        raise InvalidArgumentError(f"--region '{text}': '{where}' is neither a box x0,y0,x1,y1 nor an image file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return index, np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidArgumentError(f"--region '{text}': cannot read '{path}' as an image ({exc}); give a "
                                   "grayscale PNG (white: the adapter acts, black: it does not)") from None


def check_region_caption(value: float | str) -> float | str:
    """--region-caption: "mean" or a number (the weight of caption tokens under every region)."""
    if value == "mean":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan  # refused below, with the value as given
    check_caption(number if math.isfinite(number) else value, "--region-caption")
    return number
