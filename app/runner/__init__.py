"""The job runner: starts queued runs as training processes, watches them, and settles how they ended.

`runner` is the poll loop (`JobRunner`); `processes` keeps the book on one job's process (signals,
exit codes, stderr); `gpus` chooses a GPU for a job; `recovery` decides, for a run that no job of this
server watches, whether its process is still ours to adopt or the run must be settled.
"""

from app.runner.runner import JobRunner

__all__ = ["JobRunner"]
