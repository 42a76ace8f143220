"""Errors a user can act on. The CLI prints their message (which says what to do) without a traceback."""


class IadkitError(Exception):
    """Base of errors caused by input, files or configuration rather than by a bug."""


class ImageReadError(IadkitError, ValueError):
    """An image or mask file cannot be used; the message names the file and the problem."""


class DatasetLayoutError(IadkitError, ValueError):
    """A dataset folder does not have the expected layout; the message says what was expected."""


class WeightsNotFoundError(IadkitError, FileNotFoundError):
    """A backbone's weight file is not available; the message says how to provide it."""


class ModelFileError(IadkitError, ValueError):
    """A model file is missing, corrupt, or from an incompatible version."""


class MetricUndefinedError(IadkitError, ValueError):
    """A metric is undefined for the given data (e.g. AUROC with one class only)."""
