"""Exceptions and warnings raised when a solve fails."""

from __future__ import annotations


class ConvergenceWarning(UserWarning):
    """An iterative solve stopped before meeting its tolerance; its result is inaccurate."""


class ConvergenceError(RuntimeError):
    """An iterative solve stopped before meeting its tolerance (``on_failure="raise"``)."""


class IndefiniteSystemError(ConvergenceError):
    """Conjugate gradient met non-positive curvature: the system is not positive definite."""
