"""Exceptions raised by the library; each message names the offending value and a fix."""


class ActError(ValueError):
    """Base class for every error the library raises on bad input."""


class TransportFileError(ActError):
    """A transport file is missing, truncated, malformed or inconsistent."""


class ModelMismatchError(ActError):
    """A transport does not fit the model it is applied to (missing module, other width)."""
