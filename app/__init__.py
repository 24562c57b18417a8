"""stepscope's web server: REST API, dashboard pages, services and the job runner.

The top layer: it uses the engine (`trainer`), the recorded data (`store`) and the analysis (`analysis`).
"""
