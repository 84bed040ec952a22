"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class NeuroprojError(Exception):
    """A problem with the user's input (model, data, file, option) that the message explains how to fix."""


def missing_extra(module: str, what: str, extra: str = "export") -> NeuroprojError:
    """The one-line error for an optional dependency that failed to import, naming the extra that installs it
    (raised `from None`, instead of the ImportError's traceback)."""
    return NeuroprojError(f"{what} needs the Python package {module!r}, which is missing: "
                          f"pip install 'neuroproj-prune[{extra}]'")
