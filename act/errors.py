"""Exceptions raised by the library; each message names the offending value and a fix."""


class ActError(ValueError):
    """Base class for every error the library raises on bad input."""


class TransportFileError(ActError):
    """A transport file is missing, truncated, malformed or inconsistent."""


class ModelMismatchError(ActError):
    """A transport does not fit the model it is applied to (missing module, other width)."""


class ModulesNeverRanError(ActError):
    """Selected modules produced no output while the model ran (`sites`: which)."""

    def __init__(self, message: str, sites: list[str]) -> None:
        super().__init__(message)
        self.sites = sites
