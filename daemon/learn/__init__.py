"""The learning layer: pure torch, no threads, no I/O. The engine above it owns the state and the
lock; everything here is a function of the tensors and models it is given.

- ``models``: the model families and the staged-model contract (stages, head, features).
- ``training``: the one training loop (``fit``) with loss and step-hook plugins; evaluation.
- ``drift``: drift detectors (fit a reference, score a batch); the feature-KL detector.
- ``policy``: the per-batch decision (keep, retrain, spawn) and how a child is spawned.
- ``bootstrap``: when the first served model is published.
- ``replay``: bounded per-slice replay and held-out buffers.
- ``inherit``: spawning children, hereditary knowledge transfer, Child-Tuning.
- ``merging``: merge methods, plans, the granularity controller, distillation, the publish gate.
"""
