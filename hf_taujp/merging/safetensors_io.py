"""Moved: the one safetensors reader / writer is :mod:`hf_taujp.safetensors_io`.

Kept so that earlier imports resolve: ``StreamReader`` is ``SafetensorsReader`` (its ``dtype(name)``
now returns the safetensors code; ``torch_dtype(name)`` the torch dtype), ``ShardedWriter`` and
``dtype_name`` are the same objects.
"""
from ..safetensors_io import SafetensorsReader, ShardedWriter, dtype_name

StreamReader = SafetensorsReader

__all__ = ["StreamReader", "ShardedWriter", "dtype_name"]
