"""Sans-I/O NBD protocol codec, server side (after h11: bytes in, events out).

Pure: no sockets, no asyncio, no threads, no files.  The transport feeds
received bytes to a ``ServerConnection`` and sends what its ``reply_*``
methods return; the application decides everything the codec cannot know
(which exports exist, which metadata contexts a query selects, what a
request does to storage).  See ``connection.py`` for the model and invariants.

A thread-per-connection transport, in outline::

    conn = ServerConnection()
    sock.sendall(conn.greeting())
    while True:
        out = []                                  # buffers for one sendmsg
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, ConnectionClosed):
                ...                               # send `out`, close the socket
            out += app.handle(conn, ev)           # app calls conn.reply_*()
        if out:
            sock.sendmsg(out)
        conn.buffer_updated(sock.recv_into(conn.get_buffer()))   # 0 = EOF
"""

from jsnap.nbd.connection import ServerConnection, State
from jsnap.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from jsnap.nbd.events import (
    NEED_DATA,
    BadOption,
    BlockStatus,
    Cache,
    ConnectionClosed,
    Event,
    Flush,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionEvent,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    Read,
    RejectedRequest,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from jsnap.nbd.export import ExportInfo, transmission_flags
from jsnap.nbd.validate import validate_request

__all__ = [
    "NEED_DATA",
    "BadOption",
    "BlockStatus",
    "Cache",
    "ConnectionClosed",
    "Event",
    "ExportInfo",
    "Flush",
    "LocalProtocolError",
    "OptAbort",
    "OptExportName",
    "OptGo",
    "OptInfo",
    "OptList",
    "OptListMetaContext",
    "OptSetMetaContext",
    "OptStartTls",
    "OptStructuredReply",
    "OptionEvent",
    "ProtocolError",
    "Read",
    "RejectedRequest",
    "RemoteProtocolError",
    "Request",
    "ServerConnection",
    "State",
    "Trim",
    "Write",
    "WriteZeroes",
    "transmission_flags",
    "validate_request",
]
