"""Every real-layout builder, by name (the rows of tests/test_real_layouts.py)."""

from __future__ import annotations

import _layouts_kohya  # noqa: F401  (registers its builders)
import _layouts_more  # noqa: F401
import _layouts_other  # noqa: F401
from _layout_base import BUILDERS, Built, Q

__all__ = ["BUILDERS", "Built", "Q"]
