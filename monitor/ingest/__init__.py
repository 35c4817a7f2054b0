"""Getting data in: the live client (background writer, spool) and importers of existing logs."""
