"""The recorded data: tables, the SQLite engine and migrations, step rows with their rollups, and metric reads.

Imports neither torch nor the web server: the trainer writes through it and the server reads through it.
"""
