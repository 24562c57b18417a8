"""The job runner: hands queued runs to an executor, watches them, and settles how they ended.

`runner` is the poll loop (`JobRunner`: queue, statuses, cancels, recovery), written once for both
executors; `executor` is the small interface an executor answers; `processes` is the local executor
(subprocesses of this server) and `ray_jobs` the Ray one (Ray jobs on a cluster); `gpus` chooses a local
GPU for a job; `recovery` settles external runs whose client went silent.
"""

from app.runner.runner import JobRunner

__all__ = ["JobRunner"]
