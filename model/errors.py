"""Errors a user can act on. Each message names the file, parameter or option at fault."""


class CheckpointError(ValueError):
    """A model folder or hub repo is missing, unreadable, or does not match the model it describes."""


class UnsupportedOptionError(CheckpointError):
    """A config.json asks for an architecture option this implementation does not compute."""
