"""Stage 1, build_panels: sources -> dual-panel rows (sources, annotators, composition, the job)."""
