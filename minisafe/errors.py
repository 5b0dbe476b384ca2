"""The toolkit's exceptions: one small family, each message names the file, tensor, line or flag at fault."""


class MinisafeError(Exception):
    """Base class: anything the user can fix by changing an input."""


class ConfigError(MinisafeError):
    """A config.json (or a command-line flag) is missing a field or has a value minisafe cannot use."""


class CheckpointError(MinisafeError):
    """A checkpoint directory or weights file is missing, corrupt, of a refused format, or does not fit the model."""


class DataError(MinisafeError):
    """A dataset file is missing, empty, or has a bad row."""


class TrainingError(MinisafeError):
    """A run cannot go on: a loss or gradient norm is not finite, or a checkpoint or result cannot be written."""
