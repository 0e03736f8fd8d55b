"""Prefect flows that compose the core: train (load -> validate -> features -> train -> evaluate -> register),
evaluate, score (batch), and the quick start."""

from tripcast.errors import DataError


def retry_unless_data_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry the unexpected (a full disk, a killed process), not data errors. A
    missing month or a corrupt file will not mend, and the data layer already retries the network."""
    return not isinstance(state.data, DataError)
