"""The training loop over an explicit run state; checkpoints; validation; data-parallel helpers."""
