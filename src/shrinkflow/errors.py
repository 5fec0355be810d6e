"""The one exception type whose message is shown to the user as-is."""


class ShrinkflowError(Exception):
    """Bad input or an unrecoverable condition the user can fix.

    The CLI prints ``error: <message>`` on one line and exits with status 2, without a
    traceback, so the message must name the key or file at fault and what is allowed.
    """
