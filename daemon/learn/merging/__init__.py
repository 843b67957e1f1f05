"""Merging children back into the served model: the methods registry (task-vector merges with
typed parameters), plans and the granularity controller that chooses one, distillation for children
of another architecture, the publish gate every candidate must pass, and confirmation on fresh rows
for a candidate whose gain is not yet significant."""
