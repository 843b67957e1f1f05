"""Bounded per-slice sample buffers: replay (for training children) and held-out (for judging).

Each buffer is a reservoir sample (Vitter's algorithm R) of everything its slice ever sent, so
memory stays at ``capacity`` rows per slice however long the stream runs, and every row seen has
the same chance to be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Reservoir:
    capacity: int
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    seen: int = 0

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        if self.capacity == 0 or len(y) == 0:
            self.seen += len(y)
            return
        if self.x is None:
            self.x = torch.empty((0, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.empty((0,), dtype=y.dtype)
        room = self.capacity - len(self)
        if room > 0:
            take = min(room, len(y))
            self.x = torch.cat([self.x, x[:take]])
            self.y = torch.cat([self.y, y[:take]])
            self.seen += take
            x, y = x[take:], y[take:]
        for i in range(len(y)):
            self.seen += 1
            j = int(torch.randint(self.seen, (1,), generator=generator))
            if j < self.capacity:
                self.x[j] = x[i]
                self.y[j] = y[i]


@dataclass
class SliceBuffers:
    replay_capacity: int
    heldout_capacity: int
    replay: dict[str, Reservoir] = field(default_factory=dict)
    heldout: dict[str, Reservoir] = field(default_factory=dict)
    # rows of slices other learners hold (their contributions' replay rows): rehearsed like this
    # learner's own replay, never this learner's state (not in replay_sets, contributions or checkpoints)
    others: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, slice_name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_held: torch.Tensor,
            y_held: torch.Tensor, generator: torch.Generator) -> None:
        self.replay.setdefault(slice_name, Reservoir(self.replay_capacity)).add(x_train, y_train, generator)
        self.heldout.setdefault(slice_name, Reservoir(self.heldout_capacity)).add(x_held, y_held, generator)

    def sample_replay(self, n: int, generator: torch.Generator,
                      learning: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``n`` rows, an equal share from every slice's replay rows except ``learning``'s: this
        learner's buffers and the other learners' slices (:attr:`others`).

        The slice being learned is already in the new rows; rehearsal is for the others. Equal
        shares rather than uniform over all rows: a slice that sent little (or whose buffer is
        still filling) is rehearsed as much as a large one, which is what protects it from being
        forgotten when a child trains on a new slice. With no other slice yet, the learned
        slice's own buffer is replayed.
        """
        sets = {name: (r.x, r.y) for name, r in self.replay.items() if len(r)}
        sets = {**{name: rows for name, rows in self.others.items() if len(rows[1])}, **sets}
        parts = [rows for name, rows in sorted(sets.items()) if name != learning]
        if not parts and learning in sets:
            parts = [sets[learning]]
        if n <= 0 or not parts:
            return None
        shares = [n // len(parts) + (1 if i < n % len(parts) else 0) for i in range(len(parts))]
        xs, ys = [], []
        for (x, y), share in zip(parts, shares):
            idx = torch.randint(len(y), (share,), generator=generator)
            xs.append(x[idx])
            ys.append(y[idx])
        return torch.cat(xs), torch.cat(ys)

    def replay_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every replayed row, by slice (what a merge distils and consolidates on)."""
        return {name: (r.x, r.y) for name, r in sorted(self.replay.items()) if len(r)}

    def heldout_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (r.x, r.y) for name, r in sorted(self.heldout.items()) if len(r)}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, int]]]:
        tensors, meta = {}, {}
        for kind, group in (("replay", self.replay), ("heldout", self.heldout)):
            for name, r in group.items():
                meta.setdefault(kind, {})[name] = r.seen
                if len(r):
                    tensors[f"buf.{kind}.{name}.x"] = r.x
                    tensors[f"buf.{kind}.{name}.y"] = r.y
        return tensors, meta

    def load_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, dict[str, int]]) -> None:
        for kind, group, cap in (("replay", self.replay, self.replay_capacity),
                                 ("heldout", self.heldout, self.heldout_capacity)):
            for name, seen in meta.get(kind, {}).items():
                group[name] = Reservoir(cap, tensors.get(f"buf.{kind}.{name}.x"),
                                        tensors.get(f"buf.{kind}.{name}.y"), seen)


def balanced_rows(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], per_slice: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``per_slice`` rows of every slice in ``sets`` (slice-balanced rehearsal, as GDumb balances
    its memory): a slice with more rows gives a random subset, one with fewer gives all of its rows
    and then repeats random ones, so every slice weighs the same however much it sent."""
    xs, ys = [], []
    for _, (x, y) in sorted(sets.items()):
        if not len(y) or per_slice <= 0:
            continue
        order = torch.randperm(len(y), generator=generator)
        if len(y) < per_slice:
            extra = torch.randint(len(y), (per_slice - len(y),), generator=generator)
            order = torch.cat([order, extra])
        idx = order[:per_slice]
        xs.append(x[idx])
        ys.append(y[idx])
    if not xs:
        return None
    return torch.cat(xs), torch.cat(ys)
