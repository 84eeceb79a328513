"""Domain errors. The CLI prints their message as one line and exits non-zero."""


class PiarecError(Exception):
    """Base class for errors the pipeline reports to its operator."""


class ConfigError(PiarecError, ValueError):
    """The configuration is invalid: an unknown key, a wrong type or an impossible value."""


class InputDataError(PiarecError, ValueError):
    """Input data cannot be used: missing columns, an empty window, nothing left after filters."""


class TrainingError(PiarecError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class ModelNotFoundError(PiarecError, LookupError):
    """A model URI does not resolve to a registered version or run."""


class GateRefused(PiarecError):
    """The promotion gate refused the challenger; the message holds the reasons."""


class PathEscapeError(PiarecError, ValueError):
    """A path built from configuration or parameters would leave its storage root."""


class ValidationFailed(PiarecError):
    """Recommendations break a contract (checked before they are committed, and by
    ``piarec ops validate`` after); the message lists every problem."""
