"""stepscope's client: record a training script's steps into a stepscope server.

    import stepscope
    run = stepscope.init(server="http://127.0.0.1:8000", name="my run", config={"lr": 1e-4})
    for step in ...:
        run.log({"loss": loss, "accuracy": acc}, step=step)
    run.finish()

Importing this package imports only the standard library: no torch, no server. For Hugging Face's
Trainer, `from stepscope.hf import StepscopeCallback`.
"""

from __future__ import annotations

from stepscope.client import Run, init, replay_spool

__all__ = ["Run", "init", "replay_spool"]
