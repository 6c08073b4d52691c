"""Stores behind one protocol. Memory now; SQLite and PostgreSQL join with their issues."""
