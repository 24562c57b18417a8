"""The `stepscope` command: `train`, `serve` and `db upgrade`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from app.config import Settings
from store.db import upgrade
from store.settings import DataSettings

GRACEFUL_SHUTDOWN_SECONDS = 3  # live event streams never end by themselves
WILDCARD_HOSTS = ("0.0.0.0", "::")


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


def settings_problem(exc: ValidationError) -> str:
    """One line per setting that is wrong, naming its STEPSCOPE_ variable (or, for a rule, saying which)."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        lines.append(f"STEPSCOPE_{field.upper()}: {message}" if field else message)
    return "; ".join(lines)


def serve(settings: Settings) -> int:
    import uvicorn

    from app.main import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if settings.host in WILDCARD_HOSTS and not settings.allowed_hosts:
        logging.getLogger("stepscope").warning(
            "listening on %s: requests must name this server by a loopback name, or by a name given in "
            "STEPSCOPE_ALLOWED_HOSTS (other Host headers get 400)",
            settings.host,
        )
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
    if args.command == "db":  # only where the data lives: the server's own settings play no part
        data = DataSettings()
        upgrade(data.database_url)
        print(f"database {data.database_url} is at the newest schema")
        return 0
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)  # refuses unsafe settings, e.g. a public address without a token
    except ValidationError as exc:
        print(f"stepscope serve: refusing to start: {settings_problem(exc)}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
