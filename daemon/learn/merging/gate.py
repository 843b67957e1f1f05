"""The publish gate: a candidate is served only if it is better overall by a paired test on the
held-out rows, and no slice drops beyond the tolerance by more than sampling noise explains.

The gate protects users from a worse model, not from all change: a merge that brings in a new
slice at a small cost elsewhere is published; one that is worse overall never is.

Over 300 lines because most of it is this docstring: the rule, its formulas and the measurement
behind every default live next to the code that applies them.

Inputs (:func:`paired_gate`)
----------------------------
Per slice, the per-row correctness of the served model and of the candidate on the SAME held-out
rows (bool tensors of equal length; :func:`correctness` makes them from a model), and per-slice
weights (default equal: every slice counts the same, whatever its number of rows; larger weights
for slices seen more recently, e.g. :func:`recency_weights`). Weights are normalised to sum to 1
over the slices that have rows.

The rule
--------
Per slice ``s`` with ``n`` rows, ``g`` rows the candidate gets right and the served model wrong
(gained), ``l`` the reverse (lost): the paired difference ``d_s = (g - l) / n`` is the candidate's
accuracy minus the served one on the same rows (McNemar's discordant pairs; rows both models get
right, or both wrong, say nothing about which is better).

1. **Overall: a stratified sign test of the weighted gain.** ``D = sum_s w_s d_s``. Under the null
   hypothesis "neither model is better" each discordant row's sign is a fair coin, so
   ``Var0(D) = sum_s w_s^2 (g_s + l_s) / n_s^2``, ``se = sqrt(Var0)``, and
   ``z = sign(D) max(|D| - c, 0) / se`` with the continuity correction ``c = max_s w_s / n_s``
   (slices with discordant rows). With one slice this is McNemar's corrected statistic
   ``(|g - l| - 1) / sqrt(g + l)`` (McNemar 1947, Edwards 1948); with several, its weighted,
   stratified form (the normal approximation of the sign-flip permutation test).
   ``p_value`` is the one-sided p-value of "the candidate is better": **exact** when the sign-flip
   distribution has at most :data:`EXACT_SUPPORT` points (few discordant rows, where the normal
   approximation is conservative: 5 rows gained and none lost over three recency-weighted slices
   gave z 1.55, p 0.061, while the exact chance of 5 fair coins all landing "gained" is 0.031),
   ``P0(D' >= D)`` with each slice's discordant signs ``D'`` drawn as fair coins
   (:func:`sign_flip_p_value`); otherwise ``1 - Phi(z)``.
   **Accept only if ``D > 0`` and ``p_value <= alpha``**: the gain must be significant, so the
   chance of publishing a candidate that is not better overall is at most ``alpha``. A candidate
   worse overall by the paired test (``z <= -z_{1-alpha}``), or not better (``D <= 0``), or equal
   on every row (no discordant row: "no gain") is always rejected.
   Why significance: a real new slice gives a large gain on its rows and passes easily (0.2 -> 0.9
   on one of three slices of 150 rows, the others -0.013 and -0.007: z = 9.4), while between two
   models that are about equally good the point estimate ``D > 0`` alone published a candidate
   that was worse on all the test rows in 6-11 % of the measured gate calls, significance at
   0.05 in none (below). The cost: a small real gain waits until it is demonstrable. The gate
   always compares with the served version, so gains accumulate until they are: one slice with
   1.5 % of its rows lost needs +0.032 on 250 rows (+0.07 on 100); five slices of 250 rows gaining
   alike need +0.012 each. ``alpha=0.5`` gives point-estimate acceptance (``D`` beyond ``c``).

2. **Per-slice guard: the tolerance, beyond noise.** A slice regresses when the one-sided
   ``1 - guard_alpha`` lower confidence bound of its drop exceeds ``tolerance``. The bound is the
   Agresti-Min interval for matched proportions (Agresti & Min 2005: add 1/2 to each cell of the
   paired 2x2 table, then Wald): ``p+ = (g + 1/2)/(n + 2)``, ``p- = (l + 1/2)/(n + 2)``,
   ``drop* = p- - p+``, ``se_s = sqrt((p+ + p- - drop*^2)/(n + 2))``; regression iff
   ``drop* - z_{1-guard_alpha} se_s > tolerance``. So a small slice is not judged on noise
   (0.90 -> 0.80 on 20 rows: bound -0.007, not a regression), and a clear regression is:
   0.947 -> 0.800 on 150 rows has a bound of 0.104, on 75 rows 0.084 (> 0.05). A slice in
   ``served`` that ``candidate`` lacks is a regression: we never publish blind.

Defaults and the measurement behind them
----------------------------------------
``DEFAULT_TOLERANCE = 0.05``, ``DEFAULT_GUARD_ALPHA = 0.10``, ``DEFAULT_ALPHA = 0.05``.

Measured by ``python -m benchmarks.gate --cache /tmp/gate-models.safetensors`` (its module
docstring has the protocol; about 30 minutes on 2 CPU cores): 4 ``image_cnn`` models per stream
trained to a plateau (15 epochs) on MNIST-5k Rotated / Permuted / Split (5 slices, about 400 test
rows per slice; test accuracy 0.89-0.91 / 0.75-0.79 / 0.95-0.96), "seed" pairs (another init and
order: 18 pairs, overall difference 0.011 on average, 0.036 at most) and "continuation" pairs (a
model and itself one epoch later: 12 pairs, 0.006 / 0.020). Test rows cut into disjoint chunks
of n rows, both directions, paired difference ``d`` per slice and chunk:

============  ===  =====  ==================  =======  =============================================
pairs          n   sd d   abs d q95/q99/max   true sd  guard false rejections, guard_alpha 0.10,
                                                       tolerance 0.02 / 0.03 / 0.05 (slice-chunks)
============  ===  =====  ==================  =======  =============================================
seed          100  0.034  0.070/0.108/0.120   0.021    3.1 % / 2.2 % / 0.69 % (720)
seed          150  0.031  0.067/0.100/0.107   0.022    4.7 % / 3.1 % / 0.56 % (360)
seed          250  0.025  0.052/0.072/0.088   0.019    2.8 % / 1.1 % / 0.56 % (180)
continuation  100  0.024  0.050/0.060/0.110   0.012    1.0 % / 0.21 % / 0.21 % (480)
continuation  150  0.021  0.047/0.067/0.073   0.012    2.1 % / 1.3 % / 0 % (240)
continuation  250  0.017  0.036/0.043/0.044   0.011    1.7 % / 0 % / 0 % (120)
============  ===  =====  ==================  =======  =============================================

``true sd`` is what remains of the spread once the paired sampling variance is taken out: the
real per-slice movement between equally good models, about 0.02 (seeds) and 0.012
(continuations), whatever ``n``. The tolerance 0.05 is 2.5 times the larger (about its 99th
percentile, if normal); the confidence bound takes care of the sampling part, which shrinks with
``n``. Power (simulated, 2,000 draws of an expected 0.95 -> 0.80): caught 97.7 % at 150 rows and
83.6 % at 75 rows with the defaults (93.6 % / 70.8 % at guard_alpha 0.05; 99.7 % / 93.5 % at
tolerance 0.03, which costs up to 3.1 % false rejections per slice, about 15 % per 5-slice
merge).
Overall test, stream-level calls (5 slices of n rows, guard off): at ``alpha`` 0.05 no call
(of 420) published a candidate worse on all the test rows; at 0.2, up to 2.1 %; with the point
estimate alone (``alpha`` 0.5), 6.3-11.1 %. Measured again on newly trained models (2026-12-06,
per pair kind and chunk size): 0 at 0.05, up to 2.1 % at 0.1, up to 5.2 % at 0.2, up to 13.9 % at
0.5; the mid-p value in place of the exact one published a worse candidate in 2 of the 420 calls at
0.05 (README, "Learning quality", has what it would have bought). The new slice (0.2 -> 0.9 at
-0.01 on two other slices, 150 rows each) was published in 99.8 % of draws (median z 8.9).

References: Q. McNemar, "Note on the sampling error of the difference between correlated
proportions or percentages", Psychometrika 12 (1947); A. L. Edwards, "Note on the 'correction
for continuity' in testing the significance of the difference between correlated proportions",
Psychometrika 13 (1948); T. G. Dietterich, "Approximate statistical tests for comparing
supervised classification learning algorithms", Neural Computation 10 (1998), which recommends
McNemar's test for two classifiers compared once on the same test rows; A. Agresti and Y. Min,
"Simple improved confidence intervals for comparing matched proportions", Statistics in
Medicine 24 (2005).

A candidate rejected only because its gain is not yet significant can be confirmed later on fresh
rows, this same test on more rows at a stricter level: :mod:`daemon.learn.merging.confirm`.

:func:`gate` is the older point check on per-slice accuracies (no statistics), kept for callers
that only have accuracies (the merger's selection-half pre-filter); publishing goes through
:func:`paired_gate`. Every verdict serialises with ``dataclasses.asdict`` to plain JSON values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Mapping

import torch

from daemon.learn.training import model_input, predict_logits

DEFAULT_TOLERANCE = 0.05
DEFAULT_ALPHA = 0.05
DEFAULT_GUARD_ALPHA = 0.10
EXACT_SUPPORT = 200_000  # the exact p-value's distribution at most this many points (milliseconds to build)

_NORMAL = NormalDist()


@dataclass(frozen=True)
class SliceRegression:
    """A slice the candidate made worse beyond the tolerance. ``candidate`` is None when it was not
    measured; ``rows`` and ``drop_bound`` (the lower confidence bound of the drop) come from the
    paired gate."""
    slice: str
    served: float
    candidate: float | None
    drop: float | None = None
    rows: int | None = None
    drop_bound: float | None = None

    def __post_init__(self) -> None:
        if self.drop is None and self.candidate is not None and not math.isnan(self.candidate):
            object.__setattr__(self, "drop", self.served - self.candidate)

    def describe(self) -> str:
        if self.candidate is None or math.isnan(self.candidate):
            return f"{self.slice}: {self.served:.3f} -> not measured"
        text = f"{self.slice}: {self.served:.3f} -> {self.candidate:.3f} ({self.candidate - self.served:+.3f})"
        if self.rows is not None and self.drop_bound is not None:
            text += f" on {self.rows} rows, a drop of at least {self.drop_bound:.3f}"
        return text


@dataclass(frozen=True)
class SliceStat:
    """One slice's paired figures: accuracies on its rows, the paired difference ``diff``
    (candidate - served), the discordant rows, the guard's standard error and drop bound."""
    slice: str
    rows: int
    weight: float
    served: float
    candidate: float
    diff: float
    gained: int
    lost: int
    se: float
    drop_bound: float
    regressed: bool


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision and every figure behind it (plain values: ``asdict`` gives JSON).

    ``gain`` is the weighted mean paired difference (candidate - served), ``se`` its standard error
    under the null, ``z`` the continuity-corrected statistic, ``p_value`` the one-sided p-value of
    "the candidate is better"; ``gained``/``lost`` count discordant rows over all slices. The
    statistics are None for :func:`gate`'s accuracy-only verdicts."""
    accepted: bool
    reason: str = ""
    regressions: tuple[SliceRegression, ...] = ()
    gain: float | None = None
    served_mean: float | None = None
    candidate_mean: float | None = None
    se: float | None = None
    z: float | None = None
    p_value: float | None = None
    rows: int = 0
    gained: int = 0
    lost: int = 0
    tolerance: float | None = None
    alpha: float | None = None
    guard_alpha: float | None = None
    slices: tuple[SliceStat, ...] = field(default_factory=tuple)


def _describe(regressions) -> str:
    return "; ".join(r.describe() for r in regressions)


def gate(served: Mapping[str, float], candidate: Mapping[str, float], tolerance: float) -> GateVerdict:
    """Accuracy-only point check: reject when any slice's accuracy falls more than ``tolerance``
    below the served one. No statistics; the publish decision is :func:`paired_gate`.

    Slices the served model has no figure for (new slices) cannot regress. A slice the
    candidate could not be measured on counts as a regression: we never publish blind.
    """
    regressions = []
    for name, before in served.items():
        if before is None or math.isnan(before):
            continue
        after = candidate.get(name)
        if after is None or math.isnan(after):
            regressions.append(SliceRegression(name, before, None))
        elif after < before - tolerance:
            regressions.append(SliceRegression(name, before, after))
    regressions.sort(key=lambda r: r.slice)
    reason = _describe(regressions) if regressions else f"no slice dropped more than {tolerance}"
    return GateVerdict(not regressions, reason, tuple(regressions), tolerance=tolerance)


def _z(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return _NORMAL.inv_cdf(1 - alpha)


def sign_flip_p_value(discordant: list[tuple[float, int]], observed: float) -> float | None:
    """Exact one-sided p-value of the stratified sign test: ``discordant`` holds, per slice, the
    weight of one row's sign (``w_s / n_s``) and its number of discordant rows ``m_s``; under the null
    each of those rows adds ``+w_s/n_s`` or ``-w_s/n_s`` with probability 1/2, and the result is
    ``P0(sum >= observed)``. None when the distribution would have more than :data:`EXACT_SUPPORT`
    points (then many rows are discordant and the normal approximation is good)."""
    size = 1
    for _, m in discordant:
        size *= m + 1
        if size > EXACT_SUPPORT:
            return None
    dist: dict[float, float] = {0.0: 1.0}
    for value, m in discordant:
        # the slice's sum is value * (2k - m) with k ~ Binomial(m, 1/2)
        slice_dist = [(value * (2 * k - m), math.comb(m, k) / 2.0 ** m) for k in range(m + 1)]
        merged: dict[float, float] = {}
        for total, p in dist.items():
            for step, q in slice_dist:
                key = round(total + step, 12)   # one key per sum whatever the order of additions
                merged[key] = merged.get(key, 0.0) + p * q
        dist = merged
    # sums equal to the observed one count, whatever rounding the two computations took (1e-9 is far above
    # float error and far below any gap between two sums of real row weights)
    threshold = observed - 1e-9
    return min(sum(p for total, p in dist.items() if total >= threshold), 1.0)


def _as_bool(name: str, side: str, t) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{side}[{name!r}] must be per-row correctness (bool or 0/1), got {t.dtype}")
        t = t.bool()
    return t.reshape(-1)


def paired_gate(served: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor], *,
                weights: Mapping[str, float] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                alpha: float = DEFAULT_ALPHA, guard_alpha: float = DEFAULT_GUARD_ALPHA) -> GateVerdict:
    """Publish or not: ``served[s][i]`` / ``candidate[s][i]`` say whether each model got held-out
    row ``i`` of slice ``s`` right (the same rows for both). The rule, formulas and defaults are in
    the module docstring. ``weights`` (default equal) must cover every slice with rows; slices only
    in ``candidate`` are ignored (nothing to pair them with)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    z_alpha, z_guard = _z(alpha), _z(guard_alpha)
    missing, paired = [], {}
    for name in sorted(served):
        a = _as_bool(name, "served", served[name])
        if name not in candidate:
            if len(a):
                missing.append(SliceRegression(name, int(a.sum()) / len(a), None, rows=len(a)))
            continue
        b = _as_bool(name, "candidate", candidate[name])
        if len(a) != len(b):
            raise ValueError(f"slice {name!r}: {len(a)} served rows but {len(b)} candidate rows (same rows needed)")
        if len(a):
            paired[name] = (a, b)
    raw = {name: 1.0 for name in paired} if weights is None else {}
    if weights is not None:
        for name in paired:
            if name not in weights:
                raise ValueError(f"no weight for slice {name!r}")
            w = float(weights[name])
            if not w >= 0 or math.isinf(w):
                raise ValueError(f"weight of slice {name!r} must be finite and >= 0, got {w}")
            raw[name] = w
    total_w = sum(raw.values())
    if paired and not total_w > 0:
        raise ValueError("the slices' weights sum to 0")

    stats, regressions = [], list(missing)
    discordant: list[tuple[float, int]] = []
    gain = served_mean = cand_mean = var0 = step = 0.0
    rows = gained_all = lost_all = 0
    for name, (a, b) in paired.items():
        n = len(a)
        w = raw[name] / total_w
        g, l = int((b & ~a).sum()), int((a & ~b).sum())
        acc_a, acc_b = int(a.sum()) / n, int(b.sum()) / n
        d = (g - l) / n
        # Agresti-Min: 1/2 added to each cell of the paired 2x2 table, then Wald
        p_up, p_down = (g + 0.5) / (n + 2), (l + 0.5) / (n + 2)
        drop_adj = p_down - p_up
        se = math.sqrt(max(p_up + p_down - drop_adj ** 2, 0.0) / (n + 2))
        bound = drop_adj - z_guard * se
        regressed = bound > tolerance
        stats.append(SliceStat(name, n, w, acc_a, acc_b, d, g, l, se, bound, regressed))
        if regressed:
            regressions.append(SliceRegression(name, acc_a, acc_b, acc_a - acc_b, n, bound))
        gain += w * d
        served_mean += w * acc_a
        cand_mean += w * acc_b
        var0 += w * w * (g + l) / (n * n)
        if g + l:
            step = max(step, w / n)
            discordant.append((w / n, g + l))
        rows, gained_all, lost_all = rows + n, gained_all + g, lost_all + l
    se0 = math.sqrt(var0)
    z = math.copysign(max(abs(gain) - step, 0.0), gain) / se0 if se0 > 0 else 0.0
    exact = sign_flip_p_value(discordant, gain)
    p_value = exact if exact is not None else 0.5 * math.erfc(z / math.sqrt(2))

    regressions.sort(key=lambda r: r.slice)
    problems = []
    if regressions:
        problems.append(f"beyond tolerance {tolerance:g} ({1 - guard_alpha:.0%} bound): {_describe(regressions)}")
    figures = f"weighted gain {gain:+.4f} (z {z:.2f}, p {p_value:.3g}; {gained_all} rows gained, " \
              f"{lost_all} lost of {rows})"
    if not paired:
        problems.append("no held-out rows to judge on")
    elif gained_all + lost_all == 0:
        problems.append(f"no gain: the candidate and the served model agree on all {rows} held-out rows")
    elif z <= -z_alpha:
        problems.append(f"worse overall: {figures}")
    elif not gain > 0:
        problems.append(f"not better overall: {figures}")
    elif not p_value <= alpha:
        problems.append(f"gain not significant: {figures}, needs p <= {alpha:g}")
    accepted = not problems
    reason = (f"better overall: {figures}; no slice dropped beyond tolerance {tolerance:g}"
              if accepted else "; ".join(problems))
    return GateVerdict(accepted, reason, tuple(regressions), gain, served_mean if paired else None,
                       cand_mean if paired else None, se0, z, p_value, rows, gained_all, lost_all,
                       tolerance, alpha, guard_alpha, tuple(stats))


def recency_weights(last_seen: Mapping[str, int], now: int, half_life: float) -> dict[str, float]:
    """Slice weights that halve every ``half_life`` steps (batches, versions) since a slice was
    last seen: ``2 ** -((now - last_seen[s]) / half_life)``. Unnormalised (the gate normalises)."""
    if not half_life > 0:
        raise ValueError(f"half_life must be > 0, got {half_life}")
    return {name: 2.0 ** (-max(now - seen, 0) / half_life) for name, seen in last_seen.items()}


@torch.no_grad()
def correctness(model: torch.nn.Module, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                data_type: str | None = None) -> dict[str, torch.Tensor]:
    """Per-row correctness (bool, on the CPU) of ``model`` on ``{slice: (x, y)}``; ``data_type``
    given: ``x`` is in wire form and goes through :func:`daemon.learn.training.model_input`."""
    out = {}
    for name, (x, y) in sets.items():
        if len(y) == 0:
            out[name] = torch.zeros(0, dtype=torch.bool)
            continue
        inputs = model_input(x, data_type) if data_type is not None else x
        out[name] = predict_logits(model, inputs).argmax(1) == y.reshape(-1).cpu()
    return out
