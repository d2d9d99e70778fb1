"""The store format's names and storage settings, spelled once (``docs/store-format.md``).

Its version, the attribute key TeachCache's metadata sits under, the teacher slots, the spatial axis names, and
how every array is chunked and compressed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

__all__ = [
    "ATTRS_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NUMCODECS_WARNING",
    "SPATIAL_DIMS",
    "TEACHER_SLOT",
    "Box",
    "chunk_shape",
    "compressor_for",
    "shard_shape",
    "storage_grid",
]

FORMAT_NAME = "teachcache-store"
FORMAT_VERSION = "2.3"
# the attribute holding TeachCache's metadata: the root's description, each teacher copy's provenance
ATTRS_KEY = "teachcache"
# a teacher key: "<name>/fold_<k>" or "<name>/all_folds"
TEACHER_SLOT = re.compile(r"^(fold_[0-9]+|all_folds)$")
SPATIAL_DIMS = ("x", "y", "z")

# zarr warns, each time it parses one, that numcodecs codecs are outside the v3 spec; the store uses numcodecs'
# Delta filter on purpose (docs/store-format.md says so), so that one message is silenced wherever it arises.
NUMCODECS_WARNING = "Numcodecs codecs are not in the Zarr version 3"
warnings.filterwarnings("ignore", message=NUMCODECS_WARNING, category=UserWarning)

# a region of a case's (X, Y, Z) grid
Box = tuple[slice, slice, slice]


def compressor_for(dtype: np.dtype) -> tuple[BloscCodec, Crc32cCodec]:
    """Blosc/zstd level 5 (no shuffle for 1-byte types, bit-shuffle for 2-byte ones, byte-shuffle for wider ones),
    then a CRC-32C checksum of the compressed bytes (format ≥ 2.2): a torn or overwritten chunk fails when it is
    decoded."""
    # measured on the demo store (docs/store-format.md, "Softmax bytes"): bit-shuffling the int8 softmax margins'
    # small deltas scatters their bits (0.285 B/voxel against 0.244 unshuffled); bitshuffle suits float16 maps;
    # byte shuffle suits wider types
    size = np.dtype(dtype).itemsize
    shuffle = "noshuffle" if size == 1 else "bitshuffle" if size == 2 else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()


def shard_shape(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """The one shard that holds a whole array: its chunk grid rounded up to whole chunks (zarr requires a shard to
    be a multiple of its chunks; the part past the array's edge is never stored)."""
    return tuple(c * -(-s // c) for s, c in zip(shape, chunks, strict=True))


def storage_grid(
    shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int] | None
) -> tuple[int, ...]:
    """How many stored objects an array has along each axis: its shards (format ≥ 2.3), else its chunks."""
    unit = shards or chunks
    return tuple(-(-s // u) if s else 0 for s, u in zip(shape, unit, strict=True))  # an empty axis: no object


def chunk_shape(shape: Sequence[int], spatial_chunk: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape: whole leading (channel) axes, ``spatial_chunk`` clipped to the array on spatial axes."""
    lead = len(shape) - 3
    return tuple(shape[:lead]) + tuple(min(s, c) for s, c in zip(shape[lead:], spatial_chunk, strict=True))
