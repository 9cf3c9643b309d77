"""The errors a user can cause, and how the command line shows them.

Two documented types, both ``ValueError`` subclasses (so ``except ValueError`` in callers keeps
working):

- ``InputError``: a flag, option, data file or source model the job cannot use; the message names
  the input and the fix.
- ``CheckpointError``: a compressed (or source) checkpoint that is malformed, inconsistent with its
  own config, corrupted or of a kind this reader does not decode; the message names the file or
  tensor. ``qmoe_ray.load`` raises only this for a bad checkpoint, whatever is wrong with it.
- ``ResourceError`` (a ``RuntimeError``): the Ray cluster cannot host what the job asks for.

The command line (``qmoe_ray.cli.run``) prints these, and the plain ``ValueError`` /
``FileNotFoundError`` / ``FileExistsError`` / ``PermissionError`` the library raises for bad input,
as one line and exits with status 2. Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations


class QmoeError(Exception):
    """Base of the errors caused by the user's input (shown as one line, exit status 2)."""


class InputError(QmoeError, ValueError):
    """A bad flag, option, data file or source: the message names the input and the fix."""


class CheckpointError(QmoeError, ValueError):
    """A checkpoint that is malformed, inconsistent or not decodable: the message names it."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor or key the model needs is not in the checkpoint. Also a ``KeyError`` (lookups
    raise it), but shown with its whole message rather than a quoted key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing tensor"


class ResourceError(QmoeError, RuntimeError):
    """The cluster lacks what the job asks for (CPUs, GPUs, room to restart lost actors): the
    message names the resource, what was asked and what the cluster has."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    QmoeError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
    NotADirectoryError,
)
"""What the command line reports as a user error (one line, exit 2)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its first line if it has several)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text.splitlines()[0] if "\n" in text else text


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote names and values from a
    checkpoint or a manifest, never whole ones."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
