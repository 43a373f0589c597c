"""Exceptions raised by the sans-I/O NBD codec.

Model: two kinds of failure, told apart by who is at fault.

* ``RemoteProtocolError`` -- the peer broke a MUST of the protocol in a way
  that leaves the byte stream unusable (bad magic, truncated message, a
  payload too large to skip safely).  The only remedy is a hard disconnect
  (proto.md, "Termination of the session during option haggling" and
  "Terminating the transmission phase": either side MAY hard-disconnect on
  a violation of a mandatory condition).  Once raised, the connection object
  stays broken: every later ``next_event()`` raises the same error again.
* ``LocalProtocolError`` -- the application called the codec wrongly (it
  answered an option that is not pending, sent a READ reply that does not
  cover the request, ...).  The connection state is unchanged, so the caller
  may fix its call and try again; usually it is a bug.

Request-level problems that the spec answers with an errno (unknown command,
bad flags) are *not* exceptions: they are reported as events.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of the codec's errors; never raised itself.

    Catch this to handle both kinds; raise one of the subclasses.
    """

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise RemoteProtocolError or "
                            "LocalProtocolError")
        super().__init__(message)


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the connection must be closed (hard disconnect)."""


class LocalProtocolError(ProtocolError):
    """The application misused the codec API; nothing was sent or changed."""
