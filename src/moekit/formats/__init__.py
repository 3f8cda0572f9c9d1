"""On-disk formats below every feature: safetensors headers and slices, the checkpoint reader (design §2)."""

from moekit.formats.checkpoint import Checkpoint, Piece, Target, checkpoint_dtype, config_dtype
from moekit.formats.mapped import MappedFiles
from moekit.formats.safetensors import (
    ST_DTYPES,
    FileHandles,
    SpooledWriter,
    StreamWriter,
    TensorInfo,
    bytes_of,
    drop_cache,
    drop_file_cache,
    pread_into,
    read_header,
    read_range,
    read_tensor,
    tensor_infos,
)

__all__ = [
    "ST_DTYPES", "Checkpoint", "FileHandles", "MappedFiles", "SpooledWriter", "StreamWriter", "Piece", "Target", "TensorInfo", "bytes_of", "checkpoint_dtype",
    "config_dtype", "drop_cache", "drop_file_cache", "pread_into", "read_header", "read_range", "read_tensor", "tensor_infos",
]
