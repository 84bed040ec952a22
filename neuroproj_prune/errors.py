"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class NeuroprojError(Exception):
    """A problem with the user's input (model, data, file, option) that the message explains how to fix."""
