"""Moved to `zimage_lora.formats.safetensors_writer` (beside its reader); this name keeps old imports working."""

from ..formats.safetensors_writer import DTYPE_NAMES, StreamingWriter, dtype_name, tensor_bytes

__all__ = ["DTYPE_NAMES", "StreamingWriter", "dtype_name", "tensor_bytes"]
