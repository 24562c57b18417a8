"""stepscope's web server: REST API, job runner and dashboard."""
