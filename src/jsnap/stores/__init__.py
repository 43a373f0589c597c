"""Stores: what holds bytes and rows (files, the journal, the changes table, the catalog,
thin pools). Imports only the base modules (`jsnap.errors`, `jsnap.units`) and each other."""
