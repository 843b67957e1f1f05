"""Toy state dicts for the plan and controller tests: two children whose merges are worked out by hand."""

import torch

KEYS = ["stages.0.0.weight", "stages.0.0.bias", "stages.1.gru.weight_ih_l0", "head.weight", "head.bias"]
AVERAGE = torch.tensor([2.0, -0.5, 1.0])          # mean of the two toy children's task vectors
MAGMAX_1 = torch.tensor([3.0, -2.0, 3.0])         # magmax at lam 1: per element the larger |tau|
MAGMAX = MAGMAX_1 * 0.5                           # magmax at its default lam 0.5


def toy_states():
    base = {k: torch.zeros(3) for k in KEYS}
    base["steps"] = torch.tensor([5])                       # integer buffer: never merged
    child1 = {k: torch.tensor([1.0, -2.0, 3.0]) for k in KEYS}
    child2 = {k: torch.tensor([3.0, 1.0, -1.0]) for k in KEYS}
    for c in (child1, child2):
        c["steps"] = torch.tensor([9])
    return base, [child1, child2]


def closeness_score(target_by_key):
    """Accuracy per 'slice' = 1 - mean |state - target| over that slice's keys."""
    def score_fn(state):
        return {name: 1.0 - sum(float((state[k] - target_by_key[k]).abs().mean()) for k in keys) / len(keys)
                for name, keys in (("feat", KEYS[:3]), ("head", KEYS[3:]))}
    return score_fn
