"""Small control-plane messages: gathering reports and agreeing on errors.

These move Python objects (pickled) and are not part of the model's traffic, so they
are not in the ledger. ``agree`` is how a job fails together: every rank says whether
its step worked; if any failed, every rank learns the first failing rank's message and
raises the same error, so rank 0 can print it once and all ranks exit.
"""

from __future__ import annotations


class RemoteError(RuntimeError):
    """A step failed on some rank; the message is that rank's."""


def gather_object(group, obj, root: int = 0):
    """List of every rank's ``obj`` on ``root`` (None elsewhere)."""
    return group.comm.gather(obj, root=root)


def barrier(group) -> None:
    group.comm.Barrier()


def agree(group, error: BaseException | None) -> None:
    """Collective: raise RemoteError on every rank if ``error`` is set on any rank."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = group.comm.allgather(message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, first = failed[0]
        where = "" if len(failed) == group.size else f" (on rank {rank})"
        raise RemoteError(first + where)
