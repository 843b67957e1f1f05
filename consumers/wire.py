"""The batch wire format, version 1: what producers in any language write to the topic.

Message value: safetensors bytes holding exactly two tensors,
  ``x``  float32 | float16 | uint8 (images, tabular features) or int32 | int64 (token sequences);
         first dimension = batch size;
  ``y``  int64 labels, shape (batch,), each in [0, num_classes).
Headers (UTF-8 strings):
  ``slice``      name of the data slice (task, source, phase); [A-Za-z0-9_.:-], ≤ 128 chars;
  ``data_type``  ``image`` (x: (N,H,W) or (N,C,H,W)) | ``sequence`` (x: (N,L) integer tokens) |
                 ``tabular`` (x: (N,F));
  ``schema``     ``1``;
  ``batch_id``   optional, producer-side unique id (≤ 128 chars) used to apply each batch once.

:func:`decode_batch` never raises anything but :class:`DecodeError`, whose ``reason`` is one
of :data:`REASONS` (it becomes the ``filial-reason`` header on the dead-letter topic). A batch
that decodes but that the served model cannot take (another data_type, another row shape) is
``incompatible``: it is refused here, before it reaches training, where it would crash the
learner on every restart. The last two reasons of :data:`REASONS` are given by the consume loop
(daemon/service/consume.py), not by the decoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load as st_load, save as st_save

SCHEMA_VERSION = "1"
DATA_TYPES = ("image", "sequence", "tabular")
X_DTYPES = {
    "image": (torch.float32, torch.float16, torch.uint8),
    "tabular": (torch.float32, torch.float16, torch.uint8),
    "sequence": (torch.int32, torch.int64, torch.uint8),
}
X_RANKS = {"image": (3, 4), "sequence": (2,), "tabular": (2,)}
_SLICE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

REASONS = (
    "too_large",          # message, header or tensor over a configured limit
    "bad_bytes",          # not a safetensors payload
    "missing_tensor",     # x or y absent
    "unexpected_tensor",  # a tensor other than x and y
    "bad_dtype",          # x or y of a dtype the data type does not allow
    "bad_shape",          # wrong rank, empty batch, x/y length mismatch, negative token ids
    "incompatible",       # a data_type or row shape the served model cannot take
    "non_finite",         # NaN or Inf in x
    "label_out_of_range",
    "missing_header",
    "bad_header",         # undecodable, duplicated or malformed header value
    "unknown_data_type",
    "unknown_schema",
    "engine_error",       # the engine raised on it twice (the exception in filial-detail); its changes undone
    "crash_loop",         # it was in flight at consecutive crashes of the process; not applied again
)

Headers = Sequence[tuple[str, bytes]]


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class WireLimits(BaseModel):
    """Input limits; anything beyond them is dead-lettered, never decoded into memory."""

    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(256, gt=0)
    max_batch_rows: int = Field(4096, gt=0)
    max_dims: int = Field(4, ge=2)
    max_dim_size: int = Field(4096, gt=0)
    num_classes: int = Field(10, ge=2)
    data_type: Literal["image", "sequence", "tabular"] | None = Field(
        None, description="the data_type the served model takes; unset: the first batch's (then the model's)")
    row_shape: tuple[int, ...] | None = Field(
        None, description="shape of one row of x (x.shape[1:], e.g. [28,28] or [64]); unset: the first "
                          "batch's (then the model's)")


@dataclass(frozen=True)
class Expected:
    """What the served model takes; a field left None is not checked (nothing fixed it yet)."""
    data_type: str | None = None
    row_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BatchSource:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    slice: str
    data_type: str
    batch_id: str | None = None
    source: BatchSource | None = None

    def __len__(self) -> int:
        return len(self.y)


def encode_batch(x: torch.Tensor, y: torch.Tensor, slice: str, data_type: str,
                 batch_id: str | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return ``(value, headers)`` for a Kafka message."""
    value = st_save({"x": x.contiguous(), "y": y.to(torch.int64).contiguous()})
    headers = [("slice", slice.encode()), ("data_type", data_type.encode()),
               ("schema", SCHEMA_VERSION.encode())]
    if batch_id is not None:
        headers.append(("batch_id", batch_id.encode()))
    return value, headers


def _headers(raw: Headers | None, limits: WireLimits) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw or ():
        try:
            key, value = item
        except (TypeError, ValueError):
            raise DecodeError("bad_header", "headers must be (key, value) pairs") from None
        if not isinstance(key, str) or not isinstance(value, (bytes, bytearray)):
            raise DecodeError("bad_header", f"header {key!r} is not a (str, bytes) pair")
        if len(value) > limits.max_header_bytes:
            raise DecodeError("too_large", f"header {key!r} is {len(value)} bytes > {limits.max_header_bytes}")
        if key in out:
            raise DecodeError("bad_header", f"header {key!r} appears twice")
        try:
            out[key] = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("bad_header", f"header {key!r} is not UTF-8") from None
    return out


def decode_batch(value: bytes | None, headers: Headers | None, limits: WireLimits,
                 expected: Expected | None = None, source: BatchSource | None = None) -> Batch:
    """Validate and decode one message; ``expected`` is what the served model takes (``incompatible``
    otherwise)."""
    h = _headers(headers, limits)
    for key in ("slice", "data_type", "schema"):
        if key not in h:
            raise DecodeError("missing_header", f"header {key!r} is required")
    if h["schema"] != SCHEMA_VERSION:
        raise DecodeError("unknown_schema", f"schema {h['schema']!r}; this build reads {SCHEMA_VERSION!r}")
    data_type = h["data_type"]
    if data_type not in DATA_TYPES:
        raise DecodeError("unknown_data_type", f"data_type {data_type!r}; allowed: {', '.join(DATA_TYPES)}")
    if not _SLICE_RE.match(h["slice"]):
        raise DecodeError("bad_header", f"slice {h['slice']!r} must match {_SLICE_RE.pattern}")
    batch_id = h.get("batch_id")
    if batch_id is not None and not (0 < len(batch_id) <= 128):
        raise DecodeError("bad_header", "batch_id must be 1-128 characters")

    if not isinstance(value, (bytes, bytearray)) or not value:
        raise DecodeError("bad_bytes", "empty message value")
    if len(value) > limits.max_message_bytes:
        raise DecodeError("too_large", f"message is {len(value)} bytes > {limits.max_message_bytes}")
    try:
        tensors = st_load(bytes(value))
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise DecodeError("bad_bytes", f"not a safetensors payload ({type(exc).__name__})") from None

    for name in ("x", "y"):
        if name not in tensors:
            raise DecodeError("missing_tensor", f"tensor {name!r} is required (found {sorted(tensors)[:5]})")
    extra = sorted(set(tensors) - {"x", "y"})
    if extra:
        raise DecodeError("unexpected_tensor", f"only 'x' and 'y' are allowed, found {extra[:5]}")
    x, y = tensors["x"], tensors["y"]

    if x.dtype not in X_DTYPES[data_type]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in X_DTYPES[data_type])
        raise DecodeError("bad_dtype", f"x is {str(x.dtype).removeprefix('torch.')}; {data_type} allows {allowed}")
    if y.dtype != torch.int64:
        raise DecodeError("bad_dtype", f"y must be int64, is {str(y.dtype).removeprefix('torch.')}")
    ranks = X_RANKS[data_type]
    if x.dim() not in ranks or x.dim() > limits.max_dims:
        raise DecodeError("bad_shape", f"{data_type} x must have rank {' or '.join(map(str, ranks))}, "
                                       f"has shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise DecodeError("bad_shape", f"y must be 1-D, has shape {tuple(y.shape)}")
    if len(x) == 0 or len(x) != len(y):
        raise DecodeError("bad_shape", f"x has {len(x)} rows and y {len(y)}; need equal and > 0")
    if len(x) > limits.max_batch_rows:
        raise DecodeError("too_large", f"batch has {len(x)} rows > {limits.max_batch_rows}")
    if any(d > limits.max_dim_size for d in x.shape[1:]):
        raise DecodeError("too_large", f"x shape {tuple(x.shape)} has a dimension > {limits.max_dim_size}")
    if expected is not None and expected.data_type is not None and data_type != expected.data_type:
        raise DecodeError("incompatible", f"data_type {data_type!r}; the served model takes {expected.data_type!r}")
    if expected is not None and expected.row_shape is not None and tuple(x.shape[1:]) != expected.row_shape:
        raise DecodeError("incompatible", f"x rows are {tuple(x.shape[1:])}; the served model takes "
                                          f"{data_type} rows of {expected.row_shape}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise DecodeError("non_finite", "x contains NaN or Inf")
    if data_type == "sequence" and bool((x < 0).any()):
        raise DecodeError("bad_shape", "token ids must be >= 0")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= limits.num_classes:
        raise DecodeError("label_out_of_range", f"labels span [{lo}, {hi}]; allowed [0, {limits.num_classes - 1}]")
    return Batch(x=x, y=y, slice=h["slice"], data_type=data_type, batch_id=batch_id, source=source)

