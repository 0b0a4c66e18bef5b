"""Storage: the database layer (SQLite, PostgreSQL) and its schema migrations."""
