"""Key resolution against the model's own module names."""

from .index import ModuleIndex, Site, module_shape
from .resolve import resolve

__all__ = ["ModuleIndex", "Site", "module_shape", "resolve"]
