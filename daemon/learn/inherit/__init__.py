"""How a child inherits from the served model: spawning (copy, compact HKT child, scratch), the
HKT loss, and Child-Tuning's gradient masks."""
