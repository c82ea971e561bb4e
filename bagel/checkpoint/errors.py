"""Errors shared by every checkpoint reader and writer."""


class CheckpointError(ValueError):
    """A checkpoint file does not match the model: the message names the file, the key(s) and the
    shapes found and expected."""
