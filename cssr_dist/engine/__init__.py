"""Training engine: schedule, optimizer, checkpoints, preemption, the loop and its assembly."""
