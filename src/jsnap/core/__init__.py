"""Core: the engine (volumes, snapshots, recovery), the destager and its planning, thin
reservations, changed-block tracking, usage and check. Imports stores and base, nothing above."""
