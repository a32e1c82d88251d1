"""User-facing failures.

Every error a user can cause (bad input, bad layout, bad mapping file) is a
`CkptBridgeError`: the CLI prints its message and exits non-zero without a
traceback. Anything else is a bug and keeps its traceback.
"""


class CkptBridgeError(Exception):
    """Base class for expected, explainable failures."""


class MappingError(CkptBridgeError):
    """A mapping file is malformed or its transforms are not invertible."""


class UnsupportedArchitectureError(CkptBridgeError):
    """No mapping file handles the checkpoint's architecture or one of its features."""


class LayoutError(CkptBridgeError):
    """The requested parallel layout does not fit the model."""


class PlanError(CkptBridgeError):
    """The source tensors do not match what the config and mapping promise."""


class FormatError(CkptBridgeError):
    """A file is truncated, corrupt, or not in the format it claims to be."""


class OptionError(CkptBridgeError):
    """An option was given that has no effect on this input (options that do nothing are refused)."""


class DestinationError(CkptBridgeError):
    """The destination exists (without --force) or overlaps the source."""


class WorkerError(CkptBridgeError):
    """One of several processes converting together failed or stopped (torchrun, --workers)."""
