"""The `stepscope` command: `train`, `serve` and `db upgrade`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.config import Settings
from store.db import upgrade

GRACEFUL_SHUTDOWN_SECONDS = 3  # live event streams never end by themselves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepscope", description="LoRA fine-tuning runs, every step recorded.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="run one training run in the foreground (stepscope train --help)", add_help=False)
    serve = commands.add_parser("serve", help="start the dashboard, the REST API and the job runner")
    serve.add_argument("--host", help="address to listen on (default: STEPSCOPE_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: STEPSCOPE_PORT or 8000)")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", help="bring the database to the newest schema")
    return parser


def serve(settings: Settings) -> int:
    try:
        settings.check_safe_to_serve()
    except ValueError as exc:
        print(f"stepscope serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from app.main import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(  # the app upgrades the database and starts the job runner as it starts
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["train"]:  # the trainer owns its flags (one per config field)
        from trainer.cli import main as train_main

        return train_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        return serve(Settings(**overrides))
    settings = Settings()
    upgrade(settings.database_url)
    print(f"database {settings.database_url} is at the newest schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
