"""The schema revisions, oldest first; never edit one that has shipped (docs/storage.md)."""
