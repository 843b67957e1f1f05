"""Continual-learning metrics of ``filial bench cl``, from accuracy matrices as Avalanche builds them.

``R[i][j]``: accuracy on distinct slice ``j``'s test rows after experience ``i``; ``order[i]`` the slice
experience ``i`` trained on (a recurring slice is a new experience, its column is the same).

- **average accuracy**: the mean of the last row (every distinct slice, seen or not);
- **forgetting** (Avalanche's ``StreamForgetting``): for each slice trained on before the last
  experience, and not by the last experience, its accuracy right after the last experience that
  trained on it minus its accuracy at the end; averaged over those slices (``None`` when there are none);
- **BWT** (Lopez-Paz & Ranzato 2017, Avalanche's ``StreamBWT``): the negative of that forgetting,
  ``mean_j R[T-1][j] - R[e_j][j]``.

Plus the two delays of the benchmark, in batches (1 = at the slice's first batch): *time to serve*
and *drift delay* (:func:`time_to_serve`, :func:`drift_delay`); and the figures over seeds
(:func:`aggregate`, :func:`mean_matrix`, :func:`worst`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def avg_acc(R: Sequence[Sequence[float]]) -> float:
    if not R:
        raise ValueError("empty accuracy matrix")
    return sum(R[-1]) / len(R[-1])


def _last_training(order: Sequence[int]) -> dict[int, int]:
    """slice -> the last experience before the final one that trained on it, for slices the final
    experience did not train on."""
    if not order:
        return {}
    final = order[-1]
    last: dict[int, int] = {}
    for i, j in enumerate(order[:-1]):
        last[j] = i
    last.pop(final, None)
    return last


def forgetting(R: Sequence[Sequence[float]], order: Sequence[int] | None = None) -> float | None:
    """Avalanche's stream forgetting; ``order`` defaults to one experience per column, in column order."""
    order = list(range(len(R))) if order is None else list(order)
    if len(order) != len(R):
        raise ValueError(f"{len(R)} rows but {len(order)} experiences")
    last = _last_training(order)
    if not last:
        return None
    return sum(R[i][j] - R[-1][j] for j, i in last.items()) / len(last)


def bwt(R: Sequence[Sequence[float]], order: Sequence[int] | None = None) -> float | None:
    f = forgetting(R, order)
    return None if f is None else -f


def summarize(R: Sequence[Sequence[float]], order: Sequence[int] | None = None) -> dict[str, float | None]:
    f = forgetting(R, order)
    return {"avg_acc": avg_acc(R), "forgetting": f, "bwt": None if f is None else -f}


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value) of the values that are not None."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def time_to_serve(first_batch: dict[str, int], served: Sequence[tuple[int, dict[str, float]]],
                  final: dict[str, float], fraction: float = 0.9) -> dict[str, int | None]:
    """Per slice: batches from its first batch (stream position ``first_batch[s]``, 1-based) until the
    version followers hold reaches ``fraction`` of the slice's final accuracy.

    ``served``: ``(position, accuracy per slice)`` of each version as followers received it, in order;
    the version received after the batch at ``position`` is held from that batch on. A slice whose
    final accuracy is 0, or that is never served that well, gets ``None``. 1 means served at its
    first batch.
    """
    out: dict[str, int | None] = {}
    for s, g0 in first_batch.items():
        target = fraction * final.get(s, 0.0)
        out[s] = None
        if target <= 0:
            continue
        held: dict[str, float] | None = None
        for position, accs in served:  # the version held when the slice's first batch was done
            if position > g0:
                break
            held = accs
        if held is not None and held.get(s, 0.0) >= target:
            out[s] = 1
            continue
        for position, accs in served:
            if position > g0 and accs.get(s, 0.0) >= target:
                out[s] = position - g0 + 1
                break
    return out


def drift_delay(flags: dict[str, Sequence[bool]]) -> dict[str, int | None]:
    """Per slice, from the daemon's drift flag on each of its batches (first appearance, in order):
    the 1-based index of the first flagged batch, ``None`` if none was flagged."""
    return {s: next((i + 1 for i, flagged in enumerate(fs) if flagged), None) for s, fs in flags.items()}


# --- over seeds ----------------------------------------------------------------------------------------
def rounded(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(m[i][j] for m in matrices) / len(matrices) for j in range(len(matrices[0][i]))]
            for i in range(len(matrices[0]))]


def aggregate(runs: list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean over seeds (and sd of the average accuracy) of runs with ``matrix``, ``order``, ``seconds``,
    ``optimizer_steps`` and ``stored_rows``."""
    figures = [summarize(r.matrix, r.order) for r in runs]
    avg, sd = mean_sd([f["avg_acc"] for f in figures])
    out = {"avg_acc": rounded(avg), "avg_acc_sd": rounded(sd),
           "forgetting": rounded(mean_sd([f["forgetting"] for f in figures])[0]),
           "bwt": rounded(mean_sd([f["bwt"] for f in figures])[0]),
           "seconds": rounded(mean_sd([r.seconds for r in runs])[0], 1),
           "optimizer_steps": round(mean_sd([r.optimizer_steps for r in runs])[0]),
           "stored_rows": round(mean_sd([r.stored_rows for r in runs])[0])}
    out.update(extra or {})
    return out


def worst(values: list[int | None]) -> int | None:
    """The largest delay over seeds; ``None`` (never) when any seed never got there."""
    return None if any(v is None for v in values) else max(values)
