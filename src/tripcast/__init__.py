"""tripcast: predict NYC taxi trip durations and keep the prediction good in production."""

__version__ = "0.1.0"
