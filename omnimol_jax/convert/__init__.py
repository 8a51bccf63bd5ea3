"""Checkpoint conversion to and from Hugging Face formats."""
