"""Reading adapter files into grouped, not yet resolved, form."""

from .reader import AdapterFile, Group, read_adapter_file
from .safetensors_file import Header, TensorInfo, read_header

__all__ = ["AdapterFile", "Group", "read_adapter_file", "Header", "TensorInfo", "read_header"]
