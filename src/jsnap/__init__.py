"""jsnap: a snapshotting block store served over NBD."""

__version__ = "0.1.0"
