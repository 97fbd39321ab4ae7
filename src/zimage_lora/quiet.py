"""Keeping third-party noise away from our users.

Importing diffusers on a machine with the quantization packages installed logs CUDA-library,
kernel-hub and deprecation lines (torchao, bitsandbytes, torch's pytree) that say nothing about what
the user asked for. The command line hides third-party log lines and warnings for the whole run
unless `--verbose`; the library hides them only around the imports it makes itself, and only while
the application has not configured logging (then it gets everything, as it asked).
`ZIMAGE_LORA_VERBOSE=1` turns the hiding off everywhere.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: Warnings raised by our own code (e.g. a lossy quantized merge) always reach the user.
OWN_MODULES = r"zimage_lora(\.|$)"


#: Set by `zimage-lora --verbose` for the run, so imports made by the library show their noise too.
SHOW_ALL: ContextVar[bool] = ContextVar("zimage_lora_show_all", default=False)


def verbose_env() -> bool:
    return os.environ.get("ZIMAGE_LORA_VERBOSE", "") not in ("", "0")


@contextmanager
def hide_third_party(enabled: bool = True) -> Iterator[None]:
    """Within the block: log records below ERROR are dropped and warnings not raised by zimage_lora are
    ignored. Both are restored on exit (the CLI runs in-process in tests and in user scripts)."""
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=OWN_MODULES)
            yield
    finally:
        logging.disable(previous)


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Around an import of a third-party package made on the user's behalf (diffusers, transformers)."""
    with hide_third_party(enabled=not (SHOW_ALL.get() or verbose_env() or logging.root.handlers)):
        yield
