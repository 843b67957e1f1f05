"""``POST /predict`` bodies: JSON or safetensors, into the rows a predictor takes.

- ``Content-Type: application/json``: ``{"x": [[...], ...], "mode": "blend", "probabilities": true}``;
  only ``x`` is required. JSON has no dtypes, so the rows get the ones ``filial produce`` gives an
  npz file's arrays (tools/datasets.py): integers of a sequence model are int64 tokens; integers in
  0..255 of an image or tabular model are uint8 (pixels, scaled to [0, 1] as the daemon scales them);
  any other number makes the rows float32, taken as they are.
- ``Content-Type: application/octet-stream``: safetensors bytes holding exactly one tensor ``x``, with
  the dtypes and shapes of the Kafka wire format (consumers/wire.py: ``x`` as a producer writes it,
  without ``y``); ``mode`` and ``probabilities`` go in the query string.

Query parameters ``mode`` and ``probabilities`` work with either body. Every refusal is a
:class:`BadRequest` carrying the HTTP status and one sentence saying what to send instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load

JSON_TYPES = ("application/json",)
BINARY_TYPES = ("application/octet-stream", "application/x-safetensors")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PredictRequest:
    x: torch.Tensor
    mode: str | None
    probabilities: bool


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise BadRequest(400, f"{where} must be true or false, got {value!r}")


def _json_rows(x: Any, data_type: str | None) -> torch.Tensor:
    if not isinstance(x, list) or not x:
        raise BadRequest(400, "'x' must be a non-empty list of rows, e.g. {\"x\": [[0.0, 0.5, ...]]}")
    try:
        t = torch.tensor(x)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise BadRequest(400, "'x' must be a rectangular array of numbers (every row the same shape)") from None
    if t.dtype == torch.bool:
        raise BadRequest(400, "'x' must hold numbers, not true/false")
    if t.is_floating_point() or t.numel() == 0:
        return t.float()
    if data_type == "sequence":
        return t.long()
    if 0 <= int(t.min()) and int(t.max()) <= 255:
        return t.to(torch.uint8)  # pixels, as an npz file's integers would be
    return t.float()


def _safetensors_rows(body: bytes) -> torch.Tensor:
    try:
        tensors = st_load(body)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt input
        raise BadRequest(400, f"the body is not a safetensors file ({type(exc).__name__}); send the bytes "
                              "safetensors' save({'x': tensor}) writes") from None
    if set(tensors) != {"x"}:
        raise BadRequest(400, f"the safetensors body must hold exactly one tensor 'x', found {sorted(tensors)[:5]}")
    return tensors["x"]


def parse_predict(body: bytes, content_type: str | None, query: Mapping[str, str],
                  data_type: str | None) -> PredictRequest:
    """The request's rows, mode and whether to answer with probabilities; ``data_type`` is the served
    model's (it decides how JSON numbers are typed)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    mode, probabilities = query.get("mode"), _flag(query.get("probabilities", "true"), "probabilities")
    if kind in BINARY_TYPES:
        x = _safetensors_rows(body)
    elif kind in JSON_TYPES or not kind:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(400, f"the body is not JSON ({exc}); send {{\"x\": [[...], ...]}}") from None
        if not isinstance(doc, dict) or "x" not in doc:
            raise BadRequest(400, "the JSON body must be an object with 'x', e.g. {\"x\": [[...]], \"mode\": \"blend\"}")
        unknown = sorted(set(doc) - {"x", "mode", "probabilities"})
        if unknown:
            raise BadRequest(400, f"unknown fields {unknown}; the body takes x, mode and probabilities")
        if doc.get("mode") is not None:
            if not isinstance(doc["mode"], str) or (mode is not None and mode != doc["mode"]):
                raise BadRequest(400, "'mode' must be a string, and agree with the query's mode when both are given")
            mode = doc["mode"]
        if "probabilities" in doc:
            probabilities = _flag(doc["probabilities"], "'probabilities'")
        x = _json_rows(doc["x"], data_type)
    else:
        raise BadRequest(415, f"Content-Type {kind!r} is not taken; send application/json or "
                              "application/octet-stream (safetensors)")
    if x.dim() < 2 or len(x) == 0:
        raise BadRequest(400, f"x must be rows: at least 2 dimensions, the first the rows (got shape {tuple(x.shape)})")
    return PredictRequest(x, mode, probabilities)
