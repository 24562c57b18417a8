"""The REST API, one router per resource (each mounted under /api by app.main)."""
