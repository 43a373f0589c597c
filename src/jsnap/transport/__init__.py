"""Transport: the NBD server (listener, connection loop, dispatch), TLS, per-volume access
rules, and jsnap's own small NBD client. Imports core, stores, the codec (`jsnap.nbd`), base."""
