"""Who may talk to the server: Host allow-list, cross-site refusal, the public-address rule, the sign-in
cookie, the models a request may name, and runs whose pid now belongs to another process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bs4 import BeautifulSoup, Tag
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import Session

from app.config import Settings
from app.main import create_app
from app.runner import JobRunner
from app.runner.processes import LocalExecutor
from app.security import AUTH_COOKIE, auth_cookie_value
from store.db import make_engine
from store.processes import process_start_time
from store.tables import Run, RunStatus

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic"}
BASE = "http://127.0.0.1:8000"  # as a browser on this machine addresses the server
EVIL = "http://evil.example"


def client_for(settings: Settings, base_url: str = BASE) -> TestClient:
    return TestClient(create_app(settings, run_jobs=False), base_url=base_url, follow_redirects=False)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with client_for(settings.model_copy(update={"allowed_hosts": []})) as client:
        yield client


def state(db_path: Path) -> dict[str, Any]:
    """Everything a cross-site request could have changed: the runs, the datasets and their files."""
    with sqlite3.connect(db_path) as conn:
        runs = conn.execute("SELECT id, status, cancel_requested_at, finished_at FROM runs ORDER BY id").fetchall()
        datasets = conn.execute("SELECT id, filename FROM datasets ORDER BY id").fetchall()
    return {
        "runs": runs,
        "datasets": datasets,
        "files": sorted(p.name for p in (db_path.parent / "datasets").glob("*")),
    }


def detail(response: Any) -> str:
    return str(response.json()["detail"])


# --- Host ----------------------------------------------------------------------------------------------------


def test_a_request_for_another_host_name_gets_400_on_pages_and_api(client: TestClient) -> None:
    for path in ("/", "/runs/new", "/api/runs", "/api/health"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 400, path
        assert "evil.example" in detail(response) and "STEPSCOPE_ALLOWED_HOSTS" in detail(response)
    refused = client.post("/api/runs", json=TINY, headers={"Host": "evil.example:8000"})
    assert refused.status_code == 400
    assert client.get("/api/runs").json()["count"] == 0
    for host in ("localhost:8000", "LOCALHOST", "127.0.0.1", "127.8.9.10:1234", "[::1]:8000", "localhost."):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    for host in ("testserver", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]:8000", ""):
        assert client.get("/api/health", headers={"Host": host}).status_code == 400, host


def test_allowed_hosts_and_the_configured_host_pass(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPSCOPE_ALLOWED_HOSTS", "dash.example, Other.Example")
    settings = Settings(host="10.1.2.3", token="s3cret")
    assert settings.allowed_hosts == ["dash.example", "other.example"]
    with client_for(settings) as client:
        for host in ("dash.example", "other.example:8000", "10.1.2.3:8000", "localhost"):
            assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
        assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    with client_for(Settings(allowed_hosts="*")) as client:
        assert client.get("/api/health", headers={"Host": "anything.example"}).status_code == 200


# --- cross-site state changes ------------------------------------------------------------------------------

CROSS_SITE = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": EVIL},
              {"Origin": "null"}, {"Origin": "http://127.0.0.1:9999"}, {"Origin": "https://127.0.0.1:8000"},
              {"Origin": EVIL, "Sec-Fetch-Site": "same-origin"}]  # fmt: skip


def cross_site_attempts(client: TestClient, headers: dict[str, str], queued: int, done: int) -> list[int]:
    """Every kind of state change a web page could make a browser send; their status codes."""
    upload = {"file": ("evil.jsonl", b'{"text": "x"}\n')}
    return [
        client.post(f"/api/runs/{queued}/cancel", headers=headers).status_code,
        client.delete(f"/api/runs/{done}", headers=headers).status_code,
        client.post("/api/runs", json=TINY, headers=headers).status_code,
        client.post("/api/sweeps", json={"config": TINY, "learning_rates": [1e-3]}, headers=headers).status_code,
        client.post("/api/lr-range-tests", json={"config": TINY}, headers=headers).status_code,
        client.post(f"/api/lr-range-tests/{queued}/sweep", headers=headers).status_code,
        client.post("/api/datasets", files=upload, headers=headers).status_code,
        client.post("/runs/new", data={"csrf_token": "x" * 43}, headers=headers).status_code,
    ]


@pytest.mark.parametrize("token", ["", "s3cret"])
def test_cross_site_state_changes_are_refused_and_change_nothing(settings: Settings, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"} if token else {}
    with client_for(settings.model_copy(update={"allowed_hosts": [], "token": token})) as client:
        queued = client.post("/api/runs", json=TINY, headers=bearer).json()["id"]
        done = client.post("/api/runs", json=TINY, headers=bearer).json()["id"]
        with sqlite3.connect(settings.db_path) as conn:
            conn.execute("UPDATE runs SET status = 'completed', finished_at = '2026-01-01' WHERE id = ?", (done,))
        before = state(settings.db_path)
        for headers in CROSS_SITE:
            codes = cross_site_attempts(client, headers | bearer, queued, done)
            assert codes == [403] * len(codes), headers
        refused = client.post(f"/api/runs/{queued}/cancel", headers={"Origin": EVIL} | bearer)
        assert "another origin (http://evil.example)" in detail(refused)
        assert state(settings.db_path) == before

        # The dashboard's own origin, and scripts that send neither header, still work.
        own = {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/api/runs", json=TINY, headers=own | bearer).status_code == 201
        assert client.post("/api/runs", json=TINY, headers={"Origin": BASE.upper()} | bearer).status_code == 201
        assert client.post(f"/api/runs/{queued}/cancel", headers=bearer).json()["status"] == "cancelled"
        assert client.delete(f"/api/runs/{done}", headers=own | bearer).status_code == 204
        assert client.post("/api/runs", json=TINY, headers={"Sec-Fetch-Site": "none"} | bearer).status_code == 201
        assert client.get("/api/runs", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_the_own_origin_counts_default_ports_and_https(settings: Settings) -> None:
    with client_for(settings.model_copy(update={"allowed_hosts": []}), "https://localhost") as client:
        assert client.post("/api/runs", json=TINY, headers={"Origin": "https://localhost"}).status_code == 201
        ported = client.post("/api/runs", json=TINY, headers={"Origin": "https://localhost:443"})
        assert ported.status_code == 201
        assert client.post("/api/runs", json=TINY, headers={"Origin": "http://localhost"}).status_code == 403


# --- the public-address rule -------------------------------------------------------------------------------


def test_settings_refuse_a_public_address_without_a_token(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ValidationError, match="STEPSCOPE_TOKEN"):
            Settings(host=host)
    assert Settings(host="0.0.0.0", token="s3cret").is_public
    assert not Settings(host="::1").is_public and not Settings(host="127.0.0.2").is_public
    assert not Settings(host="localhost").is_public

    # `uvicorn --factory app.main:create_app` builds its settings from the environment: refused too.
    monkeypatch.setenv("STEPSCOPE_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="STEPSCOPE_HOST=0.0.0.0"):
        create_app()


def test_stepscope_serve_names_the_settings_it_refuses(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    monkeypatch.setenv("STEPSCOPE_HOST", "10.0.0.1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "STEPSCOPE_HOST=10.0.0.1" in err and "STEPSCOPE_TOKEN" in err
    assert main(["db", "upgrade"]) == 0  # the database does not care where a server would listen


# --- the sign-in cookie ------------------------------------------------------------------------------------


def sign_in(client: TestClient) -> Any:
    soup = BeautifulSoup(client.get("/login").text, "html.parser")
    field = soup.find("input", attrs={"name": "csrf_token"})
    assert isinstance(field, Tag)
    response = client.post("/login", data={"csrf_token": field["value"], "token": "s3cret", "next": "/"})
    assert response.status_code == 303
    return response


def cookie_attributes(response: Any) -> dict[str, str]:
    header = next(h for h in response.headers.get_list("set-cookie") if h.startswith(f"{AUTH_COOKIE}="))
    return {k.strip().lower(): v for k, _, v in (part.partition("=") for part in header.split(";")[1:])}


def test_the_cookie_is_secure_over_https_and_expires(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPSCOPE_SESSION_DAYS", "2")
    settings = Settings(token="s3cret", allowed_hosts=[])
    with client_for(settings, "https://127.0.0.1") as client:
        attributes = cookie_attributes(sign_in(client))
        assert "secure" in attributes and "httponly" in attributes and attributes["samesite"] == "strict"
        assert attributes["max-age"] == str(2 * 86_400) and "expires" in attributes
        assert client.get("/").status_code == 200
    with client_for(settings) as client:
        attributes = cookie_attributes(sign_in(client))
        assert "secure" not in attributes and attributes["max-age"] == str(2 * 86_400)
        value = client.cookies[AUTH_COOKIE]
        expiry = int(value.split(".")[0])
        assert abs(expiry - (time.time() + 2 * 86_400)) < 60  # the value carries its own expiry


def test_an_expired_or_altered_cookie_is_refused(home: Path) -> None:
    settings = Settings(token="s3cret", allowed_hosts=[])
    with client_for(settings) as client:
        assert client.get("/").status_code == 303  # not signed in: to /login

        client.cookies.set(AUTH_COOKIE, auth_cookie_value("s3cret", days=1))
        assert client.get("/").status_code == 200

        expired = auth_cookie_value("s3cret", days=30, now=time.time() - 31 * 86_400)
        client.cookies.set(AUTH_COOKIE, expired)
        assert client.get("/").status_code == 303

        expiry, signature = expired.split(".")
        client.cookies.set(AUTH_COOKIE, f"{int(expiry) + 10 * 86_400}.{signature}")  # pushed out, unsigned
        assert client.get("/").status_code == 303
        client.cookies.set(AUTH_COOKIE, auth_cookie_value("another token"))
        assert client.get("/").status_code == 303
        for junk in ("", ".", "x.y", signature, "99999999999999999999." + signature):
            client.cookies.set(AUTH_COOKIE, junk)
            assert client.get("/").status_code == 303, junk


# --- models a request may name -----------------------------------------------------------------------------


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def test_a_model_path_outside_models_dir_gets_one_answer_whether_or_not_it_exists(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    elsewhere = model_folder(tmp_path / "elsewhere")
    assert settings.models_dir is not None
    escaping = f"{settings.models_dir}/../elsewhere"
    answers = {}
    for spec in (str(elsewhere), str(tmp_path / "missing"), escaping, "/etc", "elsewhere", "./elsewhere", "../x"):
        response = client.post("/api/runs", json={**TINY, "model": spec})
        assert response.status_code == 422, spec
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "model"]
        answers[spec] = error["msg"].replace(repr(spec), "MODEL")
    assert len(set(answers.values())) == 1, answers
    assert "STEPSCOPE_MODELS_DIR" in answers["/etc"] and str(tmp_path) not in answers["/etc"]

    sweep = client.post("/api/sweeps", json={"config": {**TINY, "model": str(elsewhere)}, "learning_rates": [1e-3]})
    assert sweep.status_code == 422 and sweep.json()["detail"][0]["loc"] == ["body", "config", "model"]
    range_test = client.post("/api/lr-range-tests", json={"config": {**TINY, "model": str(elsewhere)}})
    assert range_test.status_code == 422 and "MODELS_DIR" in range_test.text
    assert client.get("/api/runs").json()["count"] == 0


def test_a_model_folder_under_models_dir_is_queued(client: TestClient, settings: Settings) -> None:
    assert settings.models_dir is not None
    mine = model_folder(settings.models_dir / "my-llama")
    response = client.post("/api/runs", json={**TINY, "model": str(mine)})
    assert response.status_code == 201
    assert response.json()["status"] == "queued" and response.json()["model"] == str(mine)
    empty = settings.models_dir / "empty"
    empty.mkdir()
    response = client.post("/api/runs", json={**TINY, "model": str(empty)})
    assert response.status_code == 422 and "no config.json" in response.text


def test_models_dir_is_a_setting(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().models_dir == home / "models"
    monkeypatch.setenv("STEPSCOPE_MODELS_DIR", str(tmp_path / "shared-models"))
    settings = Settings()
    assert settings.models_dir == tmp_path / "shared-models"
    mine = model_folder(tmp_path / "shared-models" / "m")
    with client_for(settings) as client:
        assert client.post("/api/runs", json={**TINY, "model": str(mine)}).status_code == 201


# --- a run's process: pid and start time -------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that has nothing to do with stepscope."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def running_row(settings: Settings, pid: int, pid_start: int | None) -> int:
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        run = Run(**TINY, status=RunStatus.running, pid=pid, pid_start=pid_start, config=TINY)
        session.add(run)
        session.commit()
        assert run.id is not None
        run_id = run.id
    engine.dispose()
    return run_id


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def test_process_start_time_reads_proc(tmp_path: Path) -> None:
    ticks_now = float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")
    mine = process_start_time(os.getpid())
    assert mine is not None and 0 < mine <= ticks_now
    odd = tmp_path / "a) b (c"  # the command name sits in parentheses in /proc/PID/stat, and may hold them
    odd.write_bytes(Path("/bin/sleep").read_bytes())
    odd.chmod(0o755)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        started = process_start_time(proc.pid)
        assert started is not None and mine <= started <= ticks_now + 1000
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None  # gone (reaped)
    assert process_start_time(2**22 + 12345) is None


@pytest.mark.parametrize("recorded", ["other start", "no start"])
def test_a_reused_pid_is_not_adopted_and_never_signalled(
    settings: Settings, sleeper: subprocess.Popen[bytes], recorded: str
) -> None:
    true_start = process_start_time(sleeper.pid)
    assert true_start is not None
    run_id = running_row(settings, sleeper.pid, true_start - 5 if recorded == "other start" else None)
    runner = JobRunner(settings, make_engine(settings.database_url))
    runner.start()  # recovery runs in its first poll
    try:
        assert runner.jobs == {}
    finally:
        runner.stop(timeout=2)
    with Session(runner.engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == RunStatus.interrupted and "process was gone" in (run.error or "")
    time.sleep(0.2)
    assert alive(sleeper)  # never signalled


def test_the_run_s_own_process_is_adopted(settings: Settings, sleeper: subprocess.Popen[bytes]) -> None:
    run_id = running_row(settings, sleeper.pid, process_start_time(sleeper.pid))
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        job = LocalExecutor(settings).reattach(run)
    assert job is not None and (job.pid, job.pid_start) == (sleeper.pid, process_start_time(sleeper.pid))
    assert not job.stopped_by_us  # not a job's command line: someone's own process, left alone at shutdown
    assert job.exit_code() is None
    sleeper.kill()
    sleeper.wait()
    assert job.exit_code() == 0  # gone: the runner then settles the run
    engine.dispose()


def test_jobs_and_cli_runs_record_their_start_time(settings: Settings) -> None:
    from trainer.config import make_config
    from trainer.recorder import new_run

    run_id = new_run(settings.database_url, make_config(dict(TINY)))
    with sqlite3.connect(settings.db_path) as conn:
        pid, pid_start = conn.execute("SELECT pid, pid_start FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert (pid, pid_start) == (os.getpid(), process_start_time(os.getpid()))

    engine = make_engine(settings.database_url)
    runner = JobRunner(settings, engine, command=lambda run_id: ["sleep", "30"])
    with Session(engine) as session:
        queued = Run(**TINY, config=TINY)
        session.add(queued)
        session.commit()
        queued_id = queued.id
    runner.tick()
    job = runner.jobs[queued_id]
    try:
        with sqlite3.connect(settings.db_path) as conn:
            row = conn.execute("SELECT pid, pid_start FROM runs WHERE id = ?", (queued_id,)).fetchone()
        assert row == (job.pid, process_start_time(job.pid))
    finally:
        assert job.proc is not None
        job.proc.kill()
        job.proc.wait()
        job.close_files()
        engine.dispose()
