"""Alembic's environment and revisions of the controller schema (run by storage/upgrade.py)."""
