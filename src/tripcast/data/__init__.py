"""Data sources: the TLC monthly files."""
