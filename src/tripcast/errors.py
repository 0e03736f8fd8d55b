"""Errors a user can act on. The CLI prints their message (no traceback) and exits with status 2."""


class TripcastError(Exception):
    """Base class: the message names the problem and, where there is one, the fix."""


class DataError(TripcastError):
    """Bad request for data: unknown colour, malformed month, bad range."""


class MissingMonthError(DataError):
    """The source has no file for that month."""


class CorruptFileError(DataError):
    """A downloaded file is not a readable TLC parquet file; it was removed, never cached."""


class SourceUnavailableError(DataError):
    """The TLC address (or the mirror) could not be reached."""


class RegistryError(TripcastError):
    """The model registry cannot do what was asked (no champion, unknown version, ...)."""


class RegistryUnavailableError(RegistryError):
    """The tracking server or database does not answer."""


class ModelVerificationError(RegistryError):
    """A model version failed its checks (digests, a load in a separate process, recorded predictions)."""
