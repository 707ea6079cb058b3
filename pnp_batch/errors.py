"""Exceptions shared across the package; each maps to a row failure or an exit status."""


class UsageError(Exception):
    """The request itself is unusable (exit status 2): bad option, bad manifest, unknown key."""


class RowError(Exception):
    """One row cannot be done; recorded as status=failed with this message, the run goes on."""


class TransientError(Exception):
    """A failure worth retrying (object-store throttling, 5xx, dropped connection)."""


class StoreUnavailable(TransientError):
    """The store could not be reached for longer than the outage limit (--outage-timeout): the run stops,
    leaving the rows it had in flight pending."""
