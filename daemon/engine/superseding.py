"""Supersession in the engine: each batch judged by :func:`daemon.learn.supersession.contradicted`
against the slices' profiles under the published version, the judgements counted per slice, and the
superseded slice forgotten (README "How the daemon decides", "Supersession").

The learner calls :meth:`Superseding.apply` once per batch after its decision, with the published
version's predictions and features from the observation's pass, under the engine lock. What it keeps:
the consecutive count per slice (``EngineState.contradictions``, checkpointed) and, per published
version, the slices' profiles and a slice's small batches still adding up (``EngineState.per_version``,
derived).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch

from daemon.engine.state import EngineState
from daemon.learn.supersession import CONFIRMING_BATCHES, Contradiction, SliceProfile, contradicted, profile
from daemon.learn.training import features_and_logits, model_input

log = logging.getLogger("filial.engine")

Evidence = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the version's predictions, the labels, its features


class Superseding:
    def __init__(self, min_rows: int, num_classes: int) -> None:
        self.min_rows = min_rows          # learner.min_spawn_rows: fewer rows are judged with the next ones
        self.num_classes = num_classes

    def apply(self, state: EngineState, slice_name: str, data_type: str, labels: torch.Tensor,
              predicted: torch.Tensor, features: torch.Tensor) -> Contradiction | None:
        """Supersede the older slice this batch relabels on the same inputs, once the slice's batches have
        done so :data:`CONFIRMING_BATCHES` times in a row: its buffers and bookkeeping go, so neither the
        gate nor replay holds the models to its labels any more. Returns what was superseded."""
        evidence = self._evidence(state, slice_name, (predicted, labels, features))
        if evidence is None:  # small batches still adding up: no judgement, the count stands
            return None
        found = contradicted(*evidence, _LazyProfiles(self, state, data_type), self.num_classes,
                             state.thresholds.kl, state.thresholds.concept_alpha, self.min_rows)
        previous = state.contradictions.pop(slice_name, None)
        if found is None:
            return None
        count = previous[1] + 1 if previous is not None and previous[0] == found.slice else 1
        if count < CONFIRMING_BATCHES:
            state.contradictions[slice_name] = [found.slice, count]
            log.info("a batch of %r %s: %r is superseded if %d more in a row do", slice_name, found.describe(),
                     found.slice, CONFIRMING_BATCHES - count)
            return None
        state.forget_slice(found.slice)
        for other, (older, _) in list(state.contradictions.items()):
            if older == found.slice:
                del state.contradictions[other]
        log.warning("slice %r %s on %d batches in a row: %r is superseded (its replay and held-out rows and its "
                    "accuracy bookkeeping dropped; the gate no longer holds merges to its labels)", slice_name,
                    found.describe(), count, found.slice)
        return found

    def _evidence(self, state: EngineState, slice_name: str, batch: Evidence) -> Evidence | None:
        """What to judge: this batch, or a batch under ``min_rows`` together with the slice's consecutive
        small batches before it, once they add up to that many rows (a renaming fitted to a few rows
        explains anything); None meanwhile."""
        small = state.per_version().small_batches
        earlier = small.pop(slice_name, None)
        if len(batch[1]) >= self.min_rows:
            return batch
        if earlier is not None:
            batch = tuple(torch.cat([a, b]) for a, b in zip(earlier, batch))
        if len(batch[1]) >= self.min_rows:
            return batch
        small[slice_name] = batch
        return None

    def profile(self, state: EngineState, name: str, data_type: str) -> SliceProfile | None:
        """``name``'s held-out rows under the published version, computed once per version."""
        cache = state.per_version().profiles
        if name not in cache:
            held = state.buffers.heldout_sets().get(name)
            if held is None:
                return None
            features, logits = features_and_logits(state.published_model(), model_input(held[0], data_type))
            cache[name] = profile(features, logits, held[1], self.num_classes)
        return cache[name]


class _LazyProfiles(Mapping):
    """Slice profiles as :func:`contradicted` reads them, each computed only when it is read (most
    batches are judged on the batch alone and read none)."""

    def __init__(self, superseding: Superseding, state: EngineState, data_type: str) -> None:
        self.superseding, self.state, self.data_type = superseding, state, data_type

    def _names(self) -> list[str]:  # a slice whose batches were all single rows has no held-out rows
        return sorted(name for name, held in self.state.buffers.heldout.items() if len(held))

    def __getitem__(self, name: str) -> SliceProfile:
        found = self.superseding.profile(self.state, name, self.data_type)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())
