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


class ClusterLost(Exception):
    """The compute the run depends on is gone (the Ray node or cluster died, or no worker became ready
    within --worker-timeout). Nothing is wrong with the rows: the run stops, the groups in flight stay
    to do (never recorded failed), and the run summary says why. Exit status EXIT_STATUS (3)."""

    EXIT_STATUS = 3


class StoreRefused(Exception):
    """The output store is reachable but refuses writes: full or over quota (``kind`` "store_full"), or
    read-only, denied, or gone (``kind`` "store_refused"). Not a row's fault: the run stops like an
    outage, the rows in flight stay pending, and re-running the same command resumes once it is fixed."""

    def __init__(self, kind: str, where: str, reason: str, fix: str) -> None:
        self.kind, self.where, self.reason, self.fix = kind, where, reason, fix
        super().__init__(f"[{kind}] {where} refused a write: {reason}; {fix}")
