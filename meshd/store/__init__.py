"""The world on disk: the schema and its migrations, the row codec, the SQLite shell."""
