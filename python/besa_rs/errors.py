"""Exception hierarchy of besa-rs.

Every expected user error (bad file, bad setting, missing data) is a :class:`BesaError`; the CLI
prints its one-line message and exits with status 2. Errors raised by the Rust extension are
mapped onto these classes in one place (``rust/besa-py/src/errors.rs``).
"""

from __future__ import annotations


class BesaError(Exception):
    """Base class of all besa-rs errors."""


class FormatError(BesaError, ValueError):
    """A file does not follow its format (corrupt, truncated or hostile)."""


class IntegrityError(FormatError):
    """Stored checksums do not match the data."""


class ShapeError(BesaError, ValueError):
    """A tensor does not have the shape the operation needs."""


class DtypeError(BesaError, TypeError):
    """A tensor's dtype is not supported by the operation."""


class ConfigError(BesaError, ValueError):
    """An impossible or contradictory setting."""


class DataError(BesaError, ValueError):
    """Text or calibration data is missing or too short."""


class ModelError(BesaError, ValueError):
    """A model that besa-rs cannot handle (unsupported architecture, missing weights...)."""


class NumericalError(BesaError, ArithmeticError):
    """Optimisation produced NaN or infinite values."""


class DistributedError(BesaError, RuntimeError):
    """A rank of a torch.distributed run failed, stopped answering, or disagrees."""


class MissingFileError(BesaError, FileNotFoundError):
    """A file or directory that should exist does not."""


class BesaIOError(BesaError, OSError):
    """An operating-system I/O failure."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name when it has none):
    what a one-line error quotes of a library's multi-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = [
    "BesaError",
    "BesaIOError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "DtypeError",
    "FormatError",
    "IntegrityError",
    "MissingFileError",
    "ModelError",
    "NumericalError",
    "ShapeError",
    "first_line",
]
