"""Backbones, the classifier head, and which layers train in each stage."""
