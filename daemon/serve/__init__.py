"""The serving layer: predictions from the model zoo a daemon publishes (issue 12, seed 003's
inference phase).

It follows the served line and the zoo of children in Redis (:mod:`daemon.serve.loader`), keeps
an immutable :class:`~daemon.serve.members.ZooSnapshot` of verified, loaded models that a swap
replaces in one reference assignment, and for each request batch weighs the members by how like
their training data the inputs are and how accurate they measured there
(:mod:`daemon.serve.weighting`: ``served``, ``route``, ``blend``, ``layerwise``), returning the
predictions with the members and weights used (:mod:`daemon.serve.predictor`).

It sits beside :mod:`daemon.service`: it uses :mod:`daemon.learn` (model families, the input
conversion, fingerprints, merge layer groups), :mod:`zoo_store` (the verifying followers) and the
wire conventions of :mod:`consumers.wire`; never the engine or the service. The HTTP server on
top of it is ``filial serve``.
"""
