"""`stepscope train`: one run in the foreground (or, with --run-id, a queued run for the job runner)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from store.db import upgrade
from store.settings import DataSettings, shares_home
from trainer.config import ConfigError, TrainConfig, field_help, load_config_file, make_config

log = logging.getLogger(__name__)

EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 2, "cancelled": 3, "interrupted": 4}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepscope train",
        description="Run one LoRA fine-tune in the foreground, recording every optimizer step.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="JSON or YAML file of config fields (flags override it)")
    parser.add_argument("--run-id", type=int, help="run an existing queued run (used by the server's job runner)")
    parser.add_argument(
        "--server",
        metavar="URL",
        help="with --run-id: read the run from this stepscope server and record over its API (no database here)",
    )
    parser.add_argument("--token", metavar="T", help="with --server: the server's STEPSCOPE_TOKEN")
    parser.add_argument(
        "--resume",
        type=int,
        metavar="ID",
        help="continue an interrupted run from its last checkpoint, same step numbers",
    )
    for name, (default, help_text) in field_help().items():
        shown = ",".join(default) if isinstance(default, list) else default
        flags = [_flag(name), f"--{name}"] if "_" in name else [_flag(name)]
        parser.add_argument(*flags, dest=name, metavar="VALUE", help=f"{help_text} (default: {shown})")
    return parser


def _cli_value(name: str, raw: str) -> Any:
    """Turn a flag's text into what the config field expects; pydantic does the rest of the coercion."""
    annotation = TrainConfig.model_fields[name].annotation
    if typing.get_origin(annotation) is list:
        return [part for part in raw.split(",") if part.strip()]
    if raw.lower() in ("none", "null", "") and type(None) in typing.get_args(annotation):
        return None
    return raw


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        path: Path = args.config
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        values.update(load_config_file(path))
    for name in TrainConfig.model_fields:
        if hasattr(args, name):
            values[name] = _cli_value(name, getattr(args, name))
    try:
        cfg = make_config(values)
        check_sources(cfg, DataSettings().datasets_dir)
        return cfg
    except ConfigError as exc:
        name = exc.field.split(".")[0]
        raise ConfigError(_flag(name) if name in TrainConfig.model_fields else exc.field, exc.reason) from None


def check_sources(cfg: TrainConfig, datasets_dir: Path) -> None:
    """Refuse a model or dataset that cannot be loaded before a run is created for it."""
    from trainer.catalog import ModelError, check_model
    from trainer.data import DataError, resolve_dataset

    try:
        check_model(cfg.model)
    except ModelError as exc:
        raise ConfigError("model", str(exc)) from None
    try:
        resolve_dataset(cfg.dataset, datasets_dir)
    except DataError as exc:
        raise ConfigError("dataset", str(exc)) from None
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", f"{cfg.device} requested but no CUDA GPU is available")


@contextmanager
def stop_on_signals(stop: Any) -> Iterator[None]:
    """SIGTERM (a user's cancel, through the server) and Ctrl-C finish the current step, then stop cleanly as
    `cancelled`; SIGUSR1 (the server shutting down, app.runner) the same way as `interrupted`."""
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGUSR1: stop.interrupt}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    from trainer.recorder import Recorder, new_run, run_config, run_process_alive

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = DataSettings()
    if hasattr(args, "server"):
        if not hasattr(args, "run_id"):
            parser.error("--server: only with --run-id (a run the server queued)")
        return _run_remote(parser, args, settings)
    upgrade(settings.database_url)
    try:
        if hasattr(args, "run_id"):
            values, status = run_config(settings.db_path, args.run_id)
            if status != "queued":
                parser.error(f"--run-id: run {args.run_id} is {status}, not queued")
            cfg, run_id = make_config(values), args.run_id
        elif hasattr(args, "resume"):
            values, status = run_config(settings.db_path, args.resume)
            if status != "interrupted" and not (
                status == "running" and not run_process_alive(settings.db_path, args.resume)
            ):
                parser.error(f"--resume: run {args.resume} is {status}: only an interrupted run can be resumed")
            cfg, run_id = make_config(values), args.resume
        else:
            cfg = config_from_args(args)
            run_id = new_run(settings.database_url, cfg)
    except ConfigError as exc:
        parser.error(f"{exc.field}: {exc.reason}")
    except KeyError:
        flag = "--run-id" if hasattr(args, "run_id") else "--resume"
        parser.error(f"{flag}: no run {getattr(args, 'run_id', getattr(args, 'resume', None))}")

    progress = None
    if not hasattr(args, "run_id"):  # in a terminal (a new run, or one resumed by hand): a progress bar
        from tqdm import tqdm

        progress = tqdm(desc=f"run {run_id}", unit="step", dynamic_ncols=True)
    return _train(cfg, run_id, settings, Recorder(settings.db_path, run_id), progress)


def _run_remote(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: DataSettings) -> int:
    """A queued run of a server elsewhere (a Ray job): its config over HTTP, its rows over the ingest API."""
    from trainer.http_recorder import HttpRecorder, fetch_run

    try:
        values, status = fetch_run(args.server, getattr(args, "token", None), args.run_id)
    except KeyError:
        parser.error(f"--run-id: no run {args.run_id} on {args.server}")
    if status != "queued":
        parser.error(f"--run-id: run {args.run_id} is {status}, not queued")
    try:
        cfg = make_config(values)
    except ConfigError as exc:
        parser.error(f"{exc.field}: {exc.reason}")
    settings, shared = job_home(settings)
    if not shared:
        log.info("run %d: %s is not the server's data directory: the run's files go to the server", args.run_id,
                 settings.home)  # fmt: skip
    recorder = HttpRecorder(args.server, args.run_id, getattr(args, "token", None), send_files=not shared)
    return _train(cfg, args.run_id, settings, recorder)


def job_home(settings: DataSettings) -> tuple[DataSettings, bool]:
    """Where a job recording over HTTP keeps its files (its model cache, its run's folder), and whether that is
    the server's data directory: STEPSCOPE_JOB_HOME if the node sets one (a local scratch disk), else
    STEPSCOPE_HOME (the server's path, from the job's submission). Shared when the folder there carries the
    server's name (STEPSCOPE_SERVER_ID): one machine, or a shared filesystem."""
    own = os.environ.get("STEPSCOPE_JOB_HOME")
    if own:
        settings = settings.model_copy(update={"home": Path(own).expanduser().resolve()})
    return settings, shares_home(settings.home, os.environ.get("STEPSCOPE_SERVER_ID"))


def _train(cfg: TrainConfig, run_id: int, settings: DataSettings, recorder: Any, progress: Any = None) -> int:
    from trainer.catalog import ModelError
    from trainer.data import DataError
    from trainer.loop import StopFlag, train

    stop = StopFlag()
    try:
        with stop_on_signals(stop):
            outcome = train(cfg, run_id, settings.home, recorder, stop, progress)
    except (ModelError, DataError, ValueError) as exc:  # bad input found while loading: no traceback
        print(f"run {run_id}: failed: {exc}", file=sys.stderr)
        return EXIT_CODES["failed"]
    except RuntimeError as exc:  # the writer failed: the run was marked failed through a fresh connection
        print(f"run {run_id}: failed: {exc}", file=sys.stderr)
        return EXIT_CODES["failed"]
    finally:
        if progress is not None:
            progress.close()
        with contextlib.suppress(RuntimeError):  # reported above already when the writer failed
            recorder.close()
    detail = f" ({outcome.error})" if outcome.error else ""
    print(f"run {run_id}: {outcome.status} after {outcome.steps} steps{detail}")
    return EXIT_CODES[outcome.status]


if __name__ == "__main__":
    sys.exit(main())
