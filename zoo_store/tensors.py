"""Safetensors bytes decoded into tensors without copying them: each tensor is a view of the buffer.

``safetensors.torch.load`` copies every tensor out of the bytes it is given (for 40 MB of weights that
is 40 MB of fresh memory to fault in: 26 ms on the reference machine). A follower reads the weights into
a buffer of its own anyway (:meth:`zoo_store.versions.VersionStore.read_weights`), so the tensors can
be views of it (:func:`torch.frombuffer`), and the buffer lives as long as they do.

Only what is certainly a valid safetensors file takes the fast path: the header is checked as the
safetensors library checks it (size, UTF-8 JSON object, known dtypes, shapes of non-negative integers,
offsets that tile the data exactly, each tensor's size its shape times its dtype's), and the tensor
must be aligned for its dtype in memory. Anything else (a dtype this module does not map, a
misaligned tensor, a big-endian host, a malformed file) is handed to ``safetensors.torch.load``, which
decodes it or raises :class:`safetensors.SafetensorError` saying why: what is accepted, and the
errors, are the library's. Nothing is unpickled: the header is JSON, the data raw little-endian numbers.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load as st_load

# the safetensors names of the dtypes decoded here (the common ones; the rest go to the library)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < 2 ** 63


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _views(buffer: memoryview) -> dict[str, torch.Tensor] | None:
    """The tensors as views of ``buffer``, or None unless it is certainly a valid file they can view."""
    if sys.byteorder != "little" or len(buffer) < 8:
        return None
    header_bytes = int.from_bytes(buffer[:8], "little")
    start = 8 + header_bytes
    if header_bytes > MAX_HEADER_BYTES or start > len(buffer) or header_bytes == 0 or buffer[8] != ord("{"):
        return None
    try:
        header = json.loads(buffer[8:start].tobytes().decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:   # not UTF-8, not JSON (JSONDecodeError is a ValueError)
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        return None
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS or info["dtype"] not in DTYPES:
            return None
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            return None
        entries.append((offsets[0], offsets[1], name, DTYPES[info["dtype"]], shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    end_of_last = 0
    state: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in entries:
        count = 1
        for d in shape:
            count *= d
        if begin != end_of_last or end - begin != count * dtype.itemsize:
            return None   # a gap, an overlap, or a size that is not the shape's
        end_of_last = end
        if count == 0:
            state[name] = torch.empty(shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin)
        if tensor.data_ptr() % dtype.itemsize:
            return None   # misaligned for its dtype: the library copies it into aligned memory
        state[name] = tensor.view(shape)
    if end_of_last != len(buffer) - start:
        return None       # data the header does not account for, or less than it says
    return state


def decode(buffer: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors decoded from the safetensors file in ``buffer``: views of it where that is certainly
    valid and the buffer is writable (a ``bytearray``, or a memoryview of one or of a numpy array;
    it must not be written to afterwards, and the tensors keep it alive), otherwise what
    ``safetensors.torch.load`` returns for it, :class:`safetensors.SafetensorError` included."""
    view = memoryview(buffer)
    if not view.readonly and view.contiguous and view.format == "B" and view.ndim == 1:
        try:
            state = _views(view)
        except (RuntimeError, ValueError, OverflowError):   # torch refusing a shape: the library says why
            state = None
        if state is not None:
            return state
    return st_load(view.tobytes() if not isinstance(buffer, bytes) else buffer)


__all__ = ["DTYPES", "decode"]
