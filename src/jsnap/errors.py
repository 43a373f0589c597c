"""Engine and pool errors. Each carries an errno so the NBD layer can map it to a reply."""

from __future__ import annotations

import errno as _errno


class JsnapError(Exception):
    """Base for every error jsnap reports to a user: the message is one readable line."""

    errno: int = _errno.EIO


class PoolError(JsnapError):
    """The pool cannot be created or opened (missing, already exists, locked, bad format)."""


class PoolBusy(PoolError):
    errno = _errno.EBUSY


class NotFound(JsnapError):
    errno = _errno.ENOENT


class AlreadyExists(JsnapError):
    errno = _errno.EEXIST


class InvalidRequest(JsnapError):
    """Out of range or malformed request; the request fails, the pool is unchanged."""

    errno = _errno.EINVAL


class NoSpace(JsnapError):
    errno = _errno.ENOSPC


class ReadOnly(JsnapError):
    errno = _errno.EPERM


class IntegrityError(JsnapError):
    """On-disk data failed a check; the message names the file and byte offset."""
