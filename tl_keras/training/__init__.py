"""The run: mode dispatch, phases, the run directory, checkpoints and strategies."""
