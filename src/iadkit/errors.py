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


class InvalidParameterError(IadkitError, ValueError):
    """A hyper-parameter or option has a value that cannot work; the message names it and what is accepted."""


class InvalidInputError(IadkitError, TypeError):
    """An argument of the wrong kind (e.g. something that is neither a path, an array nor a Sample)."""


class NotFittedError(IadkitError, RuntimeError):
    """A model or detector was asked to predict (or be saved) before it was fitted."""


class TrainingDataError(IadkitError, ValueError):
    """The training images cannot train this method (none, too few, or missing labelled defects)."""


class UnknownNameError(IadkitError, KeyError):
    """A method, setting or dataset source name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputPathError(IadkitError, OSError):
    """An output file or folder cannot be written; the message names it and why."""


class NonFiniteScoreError(IadkitError, ValueError):
    """A model scored an image NaN or infinite: no verdict can be given (never "good" by default)."""


class ExecutorError(IadkitError, RuntimeError):
    """A local or Ray executor cannot run the work (Ray missing, cluster unreachable, a worker died)."""


class CalibrationWarning(UserWarning):
    """The threshold could be set, but not as asked: e.g. too few good images to resolve the
    target false-alarm rate. The message says how many images set it and what to do."""


class ExportError(IadkitError, ValueError):
    """A model cannot be exported (to ONNX), or an exported file cannot be used; the message says why and what to do."""
