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
