"""Errors of the gateway layer that carry a reason back to whoever asked."""


class CommandError(Exception):
    """A command (RPC, attribute update, dose) that cannot be carried out.

    Its text is what the caller sees, e.g. in an RPC reply's ``error``.
    """
