"""The compression stages: pruning, weight sharing, ternary quantization, schedules, training."""
