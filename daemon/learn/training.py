"""The one training loop (:func:`fit`), its plugins, and the evaluation helpers.

Every optimiser step filial takes goes through :func:`fit`: the served model's bootstrap, children
(cross-entropy, hereditary knowledge transfer), distillation and the benchmarks differ only in the
:class:`Loss` they pass and the :class:`Hook` objects that watch the loop. So device, precision,
batching and the optimiser are decided here, once: the model's own device; on CUDA pinned host
memory and non-blocking copies; the precision (:func:`set_precision`: bf16 autocast on CUDA, float32 on
the CPU unless asked for bf16); Adam; one ``torch.randperm`` per epoch drawn from
the caller's generator (the only randomness the loop consumes, so a run is reproducible from it).

Inputs arrive as they travel on the wire (uint8 pixels, float features, integer tokens);
:func:`model_input` is the one place that turns them into what a model eats.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Terms = dict[str, torch.Tensor]
History = list[dict[str, float]]
log = logging.getLogger("filial.training")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_input(x: torch.Tensor, data_type: str) -> torch.Tensor:
    """Wire tensor → model tensor: uint8 images/features scale to [0, 1], tokens stay integers."""
    if data_type == "sequence":
        return x.long()
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


PRECISIONS = ("auto", "float32", "bfloat16")
_precision = "auto"


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX; torch's own probes). Elsewhere
    a bf16 autocast is emulated, slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def set_precision(name: str) -> None:
    """The process's compute precision for training and evaluation (``ModelSettings.precision``):
    ``auto``: bf16 autocast on CUDA, float32 on the CPU; ``float32``; ``bfloat16``: bf16 autocast on
    any device, worth it on a CPU with bf16 instructions (:func:`cpu_has_bf16`; README "Throughput" has
    what it buys). Process-wide, as torch's own thread count is: the engine and ``filial serve`` set it
    from their settings. Weights, optimizer state, checkpoints and published versions stay float32
    whatever it is, and a seeded run is as reproducible in bf16 as in float32."""
    global _precision
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "bfloat16" and not cpu_has_bf16():
        log.warning("precision bfloat16 on a CPU without bf16 instructions: CPU work is emulated, slower than "
                    "float32")
    _precision = name


def compute_dtype(device: torch.device) -> torch.dtype:
    """What :func:`autocast` computes in on ``device`` under the process's precision."""
    if _precision == "bfloat16" or (_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def precision_name(device: torch.device) -> str:
    """``"bfloat16"`` or ``"float32"``: :func:`compute_dtype` by name, for logs and records."""
    return str(compute_dtype(device)).removeprefix("torch.")


def autocast(device: torch.device):
    """The forward passes' precision (:func:`compute_dtype`): bf16 autocast, or nothing (float32)."""
    dtype = compute_dtype(device)
    if dtype == torch.float32 or device.type not in ("cuda", "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = True) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """A teacher for the duration: eval mode, ``requires_grad=False``; both restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Plugins


class Loss:
    """What :func:`fit` minimises. ``loss(model, x, y)`` returns named terms; ``"total"`` is the one
    minimised, every term is reported per epoch.

    :meth:`bind` runs once per fit, before the optimiser exists, and stays open for the whole fit:
    a loss with trainable parts of its own (HKT's alignment modules) builds them there and yields
    them (parameters, or optimiser param-group dicts); a loss with teachers freezes them there.
    """

    @contextmanager
    def bind(self, model: nn.Module, x: torch.Tensor) -> Iterator[list]:
        yield []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        raise NotImplementedError


class CrossEntropy(Loss):
    """Supervised training: ``CE(model(x), y)``, the one-hot targets smoothed by ``label_smoothing``
    (each class gets ``label_smoothing / classes`` of the mass; Szegedy et al. 2016, "Rethinking the
    Inception Architecture", section 7). 0: plain cross-entropy."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Terms:
        return {"total": F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)}


class Hook:
    """Watches :func:`fit`. ``before_step`` runs between ``backward`` and the optimiser step (where
    Child-Tuning masks gradients); ``after_epoch`` after each epoch, 1-based, with the model in
    eval mode and the epoch's mean loss terms (where the benchmarks evaluate)."""

    stop_requested: bool = False  # set by a hook to end training after the current epoch

    def before_step(self, model: nn.Module) -> None:
        pass

    def after_epoch(self, epoch: int, model: nn.Module, losses: dict[str, float]) -> None:
        pass


class EarlyStopping(Hook):
    """Ends :func:`fit` once ``score(model)`` (higher is better, e.g. accuracy on validation rows)
    has not improved for ``patience`` epochs, and keeps the best weights seen, the starting ones
    included (:meth:`start`); :meth:`restore_best` loads them back."""

    def __init__(self, score: Callable[[nn.Module], float], patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.score, self.patience = score, patience
        self.best, self.best_epoch, self.best_state, self.waited = float("-inf"), 0, None, 0
        self.scores: list[float] = []

    def start(self, model: nn.Module) -> "EarlyStopping":
        self._consider(0, model)
        return self

    def _consider(self, epoch: int, model: nn.Module) -> None:
        value = self.score(model)
        self.scores.append(value)
        if value > self.best:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.waited += 1
            self.stop_requested = self.waited >= self.patience

    def after_epoch(self, epoch: int, model: nn.Module, losses: dict[str, float]) -> None:
        self._consider(epoch, model)

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


class EpochCallback(Hook):
    """``fn(epoch, model, losses)`` after every epoch."""

    def __init__(self, fn: Callable[[int, nn.Module, dict[str, float]], None]) -> None:
        self.fn = fn

    def after_epoch(self, epoch: int, model: nn.Module, losses: dict[str, float]) -> None:
        self.fn(epoch, model, losses)


# ---------------------------------------------------------------------------------------------
# The loop


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int = 64,
        loss: Loss | None = None, hooks: Sequence[Hook] = (),
        generator: torch.Generator | None = None) -> History:
    """Train ``model`` in place on ``(x, y)`` (model inputs, see :func:`model_input`) with Adam.

    ``loss`` defaults to :class:`CrossEntropy`. The model stays on its device; ``x`` and ``y`` are
    moved there once. Each epoch draws one permutation from ``generator`` and takes one step per
    mini-batch. Returns each epoch's mean of every loss term; the model is left in eval mode.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    loss = loss if loss is not None else CrossEntropy()
    device = next(model.parameters()).device
    x_dev, y_dev = to_device(x, device), to_device(y, device)
    history: History = []
    with loss.bind(model, x_dev) as extra:
        groups = [{"params": [*model.parameters(), *(p for p in extra if not isinstance(p, dict))]},
                  *(g for g in extra if isinstance(g, dict))]
        optimizer = torch.optim.Adam(groups, lr=lr)
        for epoch in range(1, epochs + 1):
            model.train()
            # summed on the device in float64 (what ``.item()`` per step would give, bit for bit) and
            # read once per epoch: an ``.item()`` per step would make every step wait for the GPU
            sums: dict[str, torch.Tensor] = {}
            count = 0
            for idx in minibatches(len(x_dev), batch_size, generator):
                idx = idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device):
                    terms = loss(model, x_dev[idx], y_dev[idx])
                terms["total"].backward()
                for hook in hooks:
                    hook.before_step(model)
                optimizer.step()
                for name, value in terms.items():
                    weighted = value.detach().double() * len(idx)
                    sums[name] = sums[name] + weighted if name in sums else weighted
                count += len(idx)
            model.eval()
            history.append({name: total.item() / count for name, total in sums.items()} or {"total": 0.0})
            for hook in hooks:
                hook.after_epoch(epoch, model, history[-1])
            if any(hook.stop_requested for hook in hooks):
                break
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation

# Rows per forward pass when evaluating. Smaller chunks stay in the CPU's caches: embedding 512 rows
# with the default CNN (channels-last, one thread) takes 19 ms in chunks of 256 and 37 ms in one of
# 1,024 (128: 20 ms, 64: 21 ms): that pass is a fingerprint's refit. Small enough for any GPU, large
# enough to keep its launches few.
EVAL_BATCH = 256


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with autocast(device):
            outs.append(model(to_device(x[start:start + batch_size], device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Penultimate features (``model.features``), on the CPU as float32."""
    device = next(model.parameters()).device
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        with autocast(device):
            outs.append(model.features(to_device(x[start:start + batch_size], device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor,
                        batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of one forward pass (``model.head`` over ``model.features``, as
    the built-in families compute ``forward``; a model without a ``head`` runs twice), on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        with autocast(device):
            chunk = to_device(x[start:start + batch_size], device)
            f = model.features(chunk)
            out = model.head(f) if isinstance(getattr(model, "head", None), nn.Module) else model(chunk)
            feats.append(f.float().cpu())
            logits.append(out.float().cpu())
    return (torch.cat(feats), torch.cat(logits)) if feats else (torch.empty(0), torch.empty(0))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()
