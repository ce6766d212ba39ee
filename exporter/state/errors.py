"""The few ways the state machine refuses its input."""

from __future__ import annotations


class StateError(Exception):
    """Base class: the state machine was asked for something it cannot do."""


class InvalidInput(StateError, ValueError):
    """The arguments do not make sense (a scan of another host, confirmations < 1, ...)."""


class AcceptRefused(StateError):
    """`accept` does not apply: no baseline yet, an expected-open host, or an unknown port.

    The message is meant for the operator who ran the command.
    """


class InternalStateError(StateError, AssertionError):
    """A transition the tables say cannot happen did happen: a bug, never a user error."""
