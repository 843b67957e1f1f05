"""Predictions from the zoo: the library entry point of the serving layer.

    predictor = Predictor(loader, mode="blend")          # loader: a ZooLoader, or any () -> ZooSnapshot
    p = predictor.predict(x)                             # x: rows as on the wire (consumers/wire.py)
    p.labels, p.probabilities, p.version, p.members, p.weights

One :class:`~daemon.serve.members.ZooSnapshot` is taken at the start of :meth:`Predictor.predict`
and everything the call does runs on it, so a swap while a request is in flight never mixes two
zoos in one answer (the old snapshot stays alive as long as the request holds it). Inputs arrive
as producers write them (``x`` only; uint8 pixels, float features, integer tokens; the dtypes and
ranks of :mod:`consumers.wire`) and are converted once by :func:`daemon.learn.training.model_input`.
The modes and the weighting are in :mod:`daemon.serve.weighting`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from consumers.wire import DATA_TYPES, X_DTYPES, X_RANKS
from daemon.learn.training import model_input
from daemon.serve.members import Member, ZooSnapshot
from daemon.serve.weighting import MODES, WeightingParams


class NotReady(RuntimeError):
    """No verified served version is loaded yet."""


class InputError(ValueError):
    """The request's rows cannot be fed to the served model; the message says why."""


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor                 # (n,) int64
    probabilities: torch.Tensor          # (n, C) float32
    version: int                         # the served version of the snapshot used
    mode: str
    members: tuple[str, ...]             # "line:vN" of each weight column; the served model first
    weights: torch.Tensor                # (n, len(members)) float32, rows sum to 1


SnapshotSource = Callable[[], "ZooSnapshot | None"]


def resolve_data_type(x: torch.Tensor, served: Member, data_type: str | None) -> str:
    """The request's data type, else the served family's; a custom family's is guessed from the dtype
    (integers other than uint8 are tokens)."""
    if data_type is None:
        data_type = served.data_type
    if data_type is None:
        data_type = "sequence" if x.dtype in (torch.int32, torch.int64) else "tabular"
    if data_type not in DATA_TYPES:
        raise InputError(f"data_type {data_type!r}; allowed: {', '.join(DATA_TYPES)}")
    if served.data_type is not None and data_type != served.data_type:
        raise InputError(f"data_type {data_type!r}; the served model takes {served.data_type!r}")
    return data_type


def check_rows(x: torch.Tensor, data_type: str, served: Member) -> None:
    """The wire's dtype/rank rules, finiteness, and the row shape a built-in family fixes."""
    if x.dtype not in X_DTYPES[data_type]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in X_DTYPES[data_type])
        raise InputError(f"x is {str(x.dtype).removeprefix('torch.')}; {data_type} allows {allowed}")
    if x.dim() not in X_RANKS[data_type]:
        raise InputError(f"{data_type} x must have rank {' or '.join(map(str, X_RANKS[data_type]))}, "
                         f"has shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or Inf")
    if data_type == "sequence" and len(x) and bool((x < 0).any()):
        raise InputError("token ids must be >= 0")
    params = served.architecture.params
    if served.architecture.family == "tabular_mlp" and x.shape[1] != params.get("in_features", x.shape[1]):
        raise InputError(f"rows have {x.shape[1]} features; the served model takes {params['in_features']}")
    if served.architecture.family == "image_cnn":
        channels = x.shape[1] if x.dim() == 4 else 1
        if channels != params.get("in_channels", 1):
            raise InputError(f"images have {channels} channels; the served model takes {params.get('in_channels', 1)}")
    if data_type == "sequence" and len(x) and int(x.max()) >= params.get("vocab_size", 2 ** 62):
        raise InputError(f"token ids reach {int(x.max())}; the served model's vocabulary is {params['vocab_size']}")


class Predictor:
    """Predictions on the snapshot ``source()`` returns at the start of each call (a
    :class:`~daemon.serve.loader.ZooLoader` is such a source, as is ``lambda: snapshot``)."""

    def __init__(self, source: "SnapshotSource | ZooSnapshot", mode: str = "served",
                 params: WeightingParams | None = None, **weighting) -> None:
        """``weighting``: fields of :class:`~daemon.serve.weighting.WeightingParams` (temperature,
        sharpness, level, depth_spread) over ``params`` or its defaults."""
        if isinstance(source, ZooSnapshot):
            fixed = source
            source = lambda: fixed  # noqa: E731 (a snapshot that never changes: benchmarks, tests)
        self.source = getattr(source, "snapshot", source)
        self.mode = self._check_mode(mode)
        self.params = replace(params or WeightingParams(), **weighting)

    @staticmethod
    def _check_mode(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; known: {', '.join(MODES)}")
        return mode

    def snapshot(self) -> ZooSnapshot:
        snap = self.source()
        if snap is None:
            raise NotReady("no verified served version is loaded yet")
        return snap

    def predict(self, x: torch.Tensor, mode: str | None = None, data_type: str | None = None) -> Prediction:
        """Predict the rows of ``x`` (wire form). Raises :class:`NotReady` before the first version,
        :class:`InputError` for rows the served model cannot take, ValueError for an unknown mode."""
        mode = self._check_mode(mode or self.mode)
        snap = self.snapshot()                       # the ONE snapshot this call uses
        served = snap.served
        data_type = resolve_data_type(x, served, data_type)
        check_rows(x, data_type, served)
        members = snap.all if mode != "served" else (served,)
        if len(x) == 0:
            n_classes = int(served.architecture.params.get("num_classes", 0))
            return Prediction(torch.zeros(0, dtype=torch.long), torch.zeros(0, n_classes), served.version, mode,
                              tuple(m.name for m in members), torch.zeros(0, len(members)))
        with torch.inference_mode():
            combined = MODES[mode](members, model_input(x, data_type), self.params)
        probs = combined.probabilities
        return Prediction(probs.argmax(1), probs, served.version, mode, tuple(m.name for m in combined.members),
                          combined.weights)
