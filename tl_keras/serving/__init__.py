"""Export formats and --mode=predict on an export."""
