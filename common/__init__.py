"""What every layer shares: errors, interrupt checkpoints, atomic file writes, file hashing, package versions.

Below `models/`, `tracking/` and `pipelines/`: nothing here imports any of them (tests/test_layers.py checks it)."""
