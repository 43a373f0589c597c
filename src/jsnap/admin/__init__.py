"""Admin: the HTTP + JSON API on POOL/admin.sock (and its client call), the JSON-shaped pool
operations it shares with the CLI, the Prometheus exposition. Imports transport and below."""
