"""Prefect flows that compose the core: train (load -> validate -> features -> train -> evaluate -> register)
and the quick start."""
