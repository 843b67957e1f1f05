"""Merging children back into the served model: the methods registry (task-vector merges with
typed parameters), plans and the granularity controller that chooses one, distillation for children
of another architecture, and the publish gate every candidate must pass."""
