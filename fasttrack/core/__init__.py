"""Core: config, artifact store, stage runner, isolation. Imports nothing else of the project."""
