"""Stage 3, train: token rows -> staged decoder checkpoints and exports (Ray Train)."""
