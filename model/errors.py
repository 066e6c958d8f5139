"""Errors a user can act on. Each message names the file, parameter or option at fault."""


class CheckpointError(ValueError):
    """A model folder or hub repo is missing, unreadable, or does not match the model it describes."""


class UnsupportedOptionError(CheckpointError):
    """A config.json asks for an architecture option this implementation does not compute."""


class InvalidInputError(ValueError):
    """A prompt or sampling setting a user gave is out of range or malformed; the message says how to fix it."""
