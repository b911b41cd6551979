"""User-facing errors: one clear line that names the culprit (file, line, field).

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class FastTrackError(Exception):
    """Base class of errors caused by the user's input (config, data, model, CLI)."""


class ConfigError(FastTrackError):
    """The run config is missing, unparsable or invalid."""


class DataError(FastTrackError):
    """A data source is missing, malformed, or empty after cleaning."""


class ModelError(FastTrackError):
    """A base model or tokenizer cannot be resolved or does not fit the config."""


class StoreError(FastTrackError):
    """The artifact store refused an operation (bad key, escaping path, corrupt artifact)."""
