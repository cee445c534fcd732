"""User-facing errors: one line that names the file, tensor or op at fault."""


class OnnxPruneError(Exception):
    """A problem with the user's input, options or environment; the CLI prints it as one line, exit 2."""


class ModelError(OnnxPruneError):
    """The model file cannot be read, is not valid ONNX, or cannot be pruned as asked."""


class CalibrationError(OnnxPruneError):
    """The calibration data does not match the model's inputs, or cannot be read."""


class TargetError(OnnxPruneError):
    """The pruning target is out of range or cannot be reached."""


class ResourceError(OnnxPruneError):
    """A file or folder the run needs cannot be written: a full disk, an I/O error, an unwritable TMPDIR."""


def failure_line(exc: Exception) -> str:
    """An exception as one short line for a warning or the report: its type and the first line
    of its message (a candidate or finalist that failed, a refit that could not be kept)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
