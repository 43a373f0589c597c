"""Log output of `jsnap serve`: leveled, as text for people or JSON lines for collectors.

Model
-----
Code logs with the standard `logging` module and passes structured fields as `extra=`
(e.g. `log.info("client %s opened ...", peer, extra={"event": "open", "peer": peer})`).
The text format shows the message only (it already says what the fields say); the JSON
format writes one object per line:

    {"ts": "2025-01-31T12:00:00.123Z", "level": "info", "logger": "jsnap.server",
     "msg": "client unix opened export 'disk0'", "event": "open", "peer": "unix", ...}

`ts` is UTC with milliseconds, `level` lower case, then every `extra` field as given
(values that JSON cannot hold are written with str()), and `exc` with the traceback when
one was logged. Both go to stderr, which systemd's journal or a container runtime collects.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def announce(msg: str, fmt: str, **fields: Any) -> None:
    """Write `msg` to stderr whatever the log level (the serve command's readiness line,
    which scripts wait for): as is in text mode, as an info record in JSON mode."""
    if fmt == "json":
        rec = logging.getLogger("jsnap").makeRecord("jsnap", logging.INFO, "", 0, msg, (),
                                                    None, extra=fields)
        msg = JsonFormatter().format(rec)
    print(msg, file=sys.stderr, flush=True)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send jsnap's logs to stderr at `level` in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
