"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""
import importlib


class NeuroprojError(Exception):
    """A problem with the user's input (model, data, file, option) that the message explains how to fix."""


def require(module: str, what: str, extra: str = "export"):
    """Import an optional dependency, or fail with one line naming the extra that installs it (not the
    ImportError's traceback): `require("sentencepiece", "GGUF export")`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NeuroprojError(f"{what} needs the Python package {module.split('.')[0]!r}, which is missing: "
                             f"pip install 'neuroproj-prune[{extra}]'") from None
