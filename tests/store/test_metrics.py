"""Metric reads (store.metrics): exact series, spike-keeping downsampling, rollups, eval merge, CSV, speed."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sqlite3

import pytest

import store.metrics
import store.rollups
from app.config import Settings
from store.metrics import (
    METRIC_KEYS,
    ROLLUP_BLOCKS,
    UnknownKeys,
    compare_json,
    iter_csv,
    metrics_json,
    new_rows,
    parse_keys,
    read_metrics,
)
from store.rollups import refresh_rollups, write_steps
from store.tables import STEP_COLUMNS
from tests.conftest import add_steps, step_row

MARKS = ", ".join("?" * (len(STEP_COLUMNS) + 2))
STEP_SQL = f"INSERT INTO step_metrics (run_id, step, {', '.join(STEP_COLUMNS)}) VALUES ({MARKS})"


def add_run(db: sqlite3.Connection, name: str = "run", lr: float = 1e-3) -> int:
    sql = (
        "INSERT INTO runs (name, kind, status, model, dataset, learning_rate, batch_size, optimizer, config, "
        "created_at, steps_done) VALUES (?, 'train', 'completed', 'tiny-random-llama', 'synthetic-arithmetic', ?, 8, "
        "'adamw', '{}', '2026-01-01 00:00:00.000000', 0)"
    )
    run_id = db.execute(sql, (name, lr)).lastrowid
    assert run_id is not None
    return run_id


def test_parse_keys_validates_against_the_step_columns_and_eval_loss() -> None:
    assert parse_keys(None) == ["loss"]
    assert parse_keys(" loss, lr ,loss,") == ["loss", "lr"]
    assert parse_keys("eval_loss") == ["eval_loss"]
    with pytest.raises(UnknownKeys) as err:
        parse_keys("loss,bogus,step;drop")
    assert err.value.unknown == ["bogus", "step;drop"]
    assert "bogus" in str(err.value) and "grad_norm" in str(err.value)
    assert set(METRIC_KEYS) == {*STEP_COLUMNS, "eval_loss"}


def test_every_step_comes_back_exactly_and_in_order(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    other = add_run(db, "other")
    losses = [random.Random(1).uniform(0.5, 3.0) for _ in range(500)]
    order = list(range(500))
    random.Random(2).shuffle(order)  # rows arrive out of order: the answer must still be in step order
    db.execute("BEGIN")
    db.executemany(STEP_SQL, [step_row(run_id, i + 1, losses[i]) for i in order])
    db.execute("COMMIT")
    add_steps(db, other, [9.0] * 10)

    body = json.loads(metrics_json(db, run_id, ["loss", "lr", "tokens"]))
    assert body["run_id"] == run_id and body["downsampled"] is False
    assert body["steps"] == list(range(1, 501))
    assert body["series"]["loss"] == pytest.approx(losses, rel=1e-14)
    assert body["series"]["lr"] == [1e-3] * 500
    assert body["series"]["tokens"] == [s * 100 for s in range(1, 501)]
    tail = json.loads(metrics_json(db, run_id, ["loss"], since_step=495))
    assert tail["steps"] == [496, 497, 498, 499, 500]
    python = read_metrics(db, run_id, ["loss", "lr", "tokens"])
    assert python.steps == body["steps"] and python.series["lr"] == body["series"]["lr"]

    evals = [(run_id, s, s / 1000, 0.0) for s in range(500, 0, -10)]  # also out of order
    db.executemany("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)", evals)
    joined = json.loads(metrics_json(db, run_id, ["loss", "eval_loss"]))
    assert joined["steps"] == list(range(1, 501))
    assert joined["series"]["loss"] == body["series"]["loss"]
    assert [v for v in joined["series"]["eval_loss"] if v is not None] == [s / 1000 for s in range(10, 501, 10)]
    assert joined["series"]["eval_loss"][9] == 0.01 and joined["series"]["eval_loss"][10] is None


def test_non_finite_values_become_null(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    add_steps(db, run_id, [1.0, math.inf, None, -math.inf, 2.0])
    body = json.loads(metrics_json(db, run_id, ["loss"]))  # strict JSON: no Infinity tokens
    assert body["series"]["loss"] == [1.0, None, None, None, 2.0]
    assert read_metrics(db, run_id, ["loss"]).series["loss"] == [1.0, None, None, None, 2.0]
    small = json.loads(metrics_json(db, run_id, ["loss"], max_points=3))  # 4 at least: first, last, min, max
    assert small["downsampled"] is True and small["steps"] == [1, 2, 4, 5]
    assert small["series"]["loss"] == [1.0, None, None, 2.0]  # the infinite extremes are kept, as null


def test_a_single_spike_among_100000_steps_survives_a_1000_point_answer(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    rng = random.Random(0)
    losses: list[float | None] = [2.0 - i * 1e-5 + rng.uniform(-0.01, 0.01) for i in range(100_000)]
    spike_step, dip_step = 61_237, 12_345
    losses[spike_step - 1] = 50.0
    losses[dip_step - 1] = -3.0
    add_steps(db, run_id, losses)

    body = json.loads(metrics_json(db, run_id, ["loss"], max_points=1000))
    assert body["downsampled"] is True
    assert len(body["steps"]) <= 1000
    assert len(body["steps"]) > 900  # the budget is used, not wasted
    assert body["steps"] == sorted(body["steps"])
    assert body["steps"][0] == 1 and body["steps"][-1] == 100_000
    points = dict(zip(body["steps"], body["series"]["loss"], strict=True))
    assert points[spike_step] == 50.0
    assert points[dip_step] == -3.0
    assert max(body["series"]["loss"]) == 50.0

    # with several keys the budget is shared, and each key's spikes still survive
    two = json.loads(metrics_json(db, run_id, ["loss", "lr"], max_points=1000))
    assert len(two["steps"]) <= 1000 and 50.0 in two["series"]["loss"]


def test_downsampling_keeps_min_and_max_of_each_bucket(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    losses: list[float | None] = [0.0] * 20
    losses[3], losses[15], losses[9] = 5.0, -5.0, None
    add_steps(db, run_id, losses)
    small = read_metrics(db, run_id, ["loss"], max_points=6)  # (6 - 2) // 2 = 2 buckets of 10 steps
    assert small.downsampled is True and len(small.steps) <= 6
    assert {1, 20, 4, 16} <= set(small.steps)
    assert dict(zip(small.steps, small.series["loss"], strict=True))[4] == 5.0
    assert read_metrics(db, run_id, ["loss"], max_points=20).downsampled is False
    assert len(read_metrics(db, run_id, ["loss"], max_points=20).steps) == 20


def test_eval_loss_is_merged_by_step(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    add_steps(db, run_id, [3.0, 2.0, 1.5, 1.2])
    evals = [(run_id, 0, 3.5, 0.0), (run_id, 2, 2.5, 0.1), (run_id, 4, 1.4, 0.2)]
    db.executemany("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)", evals)

    both = json.loads(metrics_json(db, run_id, ["loss", "eval_loss"]))
    assert both["steps"] == [0, 1, 2, 3, 4]  # the eval before the first step is kept
    assert both["series"]["loss"] == [None, 3.0, 2.0, 1.5, 1.2]
    assert both["series"]["eval_loss"] == [3.5, None, 2.5, None, 1.4]
    only = json.loads(metrics_json(db, run_id, ["eval_loss"]))
    assert only["steps"] == [0, 2, 4] and only["series"]["eval_loss"] == [3.5, 2.5, 1.4]

    steps, evals_after = new_rows(db, run_id, after_step=1, limit=2)
    assert steps.steps == [2, 3] and steps.series["loss"] == [2.0, 1.5]
    assert evals_after.steps == [2]  # evals past the last step row sent wait for the next batch


def test_eval_loss_is_downsampled_with_its_spikes(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    add_steps(db, run_id, [2.0] * 5000)
    evals = [(run_id, s, 9.0 if s == 2470 else 1.0, 0.0) for s in range(10, 5001, 10)]
    db.executemany("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)", evals)
    body = json.loads(metrics_json(db, run_id, ["loss", "eval_loss"], max_points=200))
    assert body["downsampled"] is True and len(body["steps"]) <= 200
    points = dict(zip(body["steps"], body["series"]["eval_loss"], strict=True))
    assert points[2470] == 9.0
    assert set(body["series"]["loss"]) == {2.0}
    full = json.loads(metrics_json(db, run_id, ["loss", "eval_loss"]))  # evals join the step rows
    assert len(full["steps"]) == 5000 and full["series"]["eval_loss"][2469] == 9.0
    assert full["series"]["eval_loss"][2468] is None


def test_csv_has_every_step_and_every_column(db: sqlite3.Connection) -> None:
    run_id = add_run(db)
    add_steps(db, run_id, [float(i) for i in range(1, 12_001)])
    db.execute("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, 10, 0.25, 1.0)", (run_id,))
    text = "".join(iter_csv(db, run_id, chunk_rows=5000))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["step", *STEP_COLUMNS, "eval_loss"]
    assert len(rows) == 12_000
    assert [int(r["step"]) for r in rows] == list(range(1, 12_001))
    assert rows[9]["eval_loss"] == "0.25" and rows[8]["eval_loss"] == ""
    assert float(rows[11_999]["loss"]) == 12_000.0 and rows[0]["tokens"] == "100"


def test_compare_names_each_run(db: sqlite3.Connection) -> None:
    a, b = add_run(db, "slow", 1e-4), add_run(db, "fast", 1e-2)
    add_steps(db, a, [2.0, 1.9])
    add_steps(db, b, [2.0, 1.0, 0.5])
    body = json.loads(compare_json(db, [b, a], ["loss"]))
    assert body["keys"] == ["loss"]
    assert [(r["id"], r["name"], r["learning_rate"]) for r in body["runs"]] == [(b, "fast", 1e-2), (a, "slow", 1e-4)]
    assert body["runs"][0]["series"]["loss"] == [2.0, 1.0, 0.5] and body["runs"][0]["status"] == "completed"
    # Every point of several runs is read on two connections: the same answer, in the order asked.
    assert body["runs"][1]["series"]["loss"] == [2.0, 1.9] and body["runs"][1]["steps"] == [1, 2]
    assert json.loads(compare_json(db, [b], ["loss"]))["runs"][0] == body["runs"][0]
    with pytest.raises(LookupError, match="999"):
        compare_json(db, [a, 999], ["loss"])


# --- rollups ---------------------------------------------------------------------------------------------

NULLABLE = {"loss", "grad_norm", "update_norm", "param_norm", "update_ratio", "step_scale"}


def random_rows(run_id: int, steps: range, seed: int, nulls: bool) -> list[tuple[object, ...]]:
    """Noisy rows with spikes and dips at random steps, ties (repeated values), inf and, if `nulls`, NULLs."""
    rng = random.Random(seed)
    rows = []
    for step in steps:
        values: list[object] = []
        for column in STEP_COLUMNS:
            roll = rng.random()
            if roll < 0.3:
                value: object = rng.choice([0.5, 1.0, 2.0])  # ties: the earliest step must win
            elif roll < 0.302:
                value = rng.choice([1e6, -1e6, math.inf, -math.inf])
            else:
                value = rng.gauss(1.0, 0.1)
            if column in ("samples", "tokens"):
                value = step * 8 + rng.randrange(3)
            elif nulls and column in NULLABLE and (rng.random() < 0.03 or (column == "loss" and 3000 < step < 3700)):
                value = None  # scattered NULLs, and a stretch of them longer than a level-0 block
            values.append(value)
        rows.append((run_id, step, *values))
    return rows


def write_in_batches(db: sqlite3.Connection, rows: list[tuple[object, ...]], seed: int) -> None:
    """The recorder's way, in transactions of uneven sizes."""
    rng = random.Random(seed)
    i = 0
    while i < len(rows):
        batch = rows[i : i + rng.choice([1, 7, 33, 500, 2900])]
        db.execute("BEGIN")
        write_steps(db, int(batch[0][0]), batch)  # type: ignore[arg-type]
        db.execute("COMMIT")
        i += len(batch)


def stored_rollups(db: sqlite3.Connection, run_id: int) -> list[tuple[object, ...]]:
    return db.execute("SELECT * FROM step_rollups WHERE run_id = ? ORDER BY level, block", (run_id,)).fetchall()


@pytest.fixture
def rollup_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each downsampled read that could use rollups found them matching the rows."""
    seen: list[bool] = []
    check = store.metrics._rollups_match

    def spy(*args: object) -> bool:
        seen.append(check(*args))  # type: ignore[arg-type]
        return seen[-1]

    monkeypatch.setattr(store.metrics, "_rollups_match", spy)
    return seen


def answers(db: sqlite3.Connection, run_id: int, cases: list[tuple[list[str], int | None, int]]) -> list[object]:
    return [
        (json.loads(metrics_json(db, run_id, keys, since, points)), read_metrics(db, run_id, keys, since, points))
        for keys, since, points in cases
    ]


def assert_same_as_a_scan(db: sqlite3.Connection, run_id: int, cases: list[tuple[list[str], int | None, int]]) -> None:
    """The answers read from rollups equal those of a scan of the rows (the rollups deleted, then restored)."""
    with_rollups = answers(db, run_id, cases)
    kept = stored_rollups(db, run_id)
    db.execute("DELETE FROM step_rollups WHERE run_id = ?", (run_id,))
    scanned = answers(db, run_id, cases)
    refresh_rollups(db, run_id)
    assert stored_rollups(db, run_id) == kept  # rollups written batch by batch = those of the whole run at once
    for case, fast, slow in zip(cases, with_rollups, scanned, strict=True):
        assert fast == slow, case


@pytest.mark.parametrize("nulls", [True, False], ids=["with-nulls", "no-nulls"])
def test_downsampling_from_rollups_gives_the_answers_of_a_scan(
    db: sqlite3.Connection, rollup_reads: list[bool], nulls: bool
) -> None:
    run_id = add_run(db)
    n = 23_456  # not a whole number of blocks
    rows = random_rows(run_id, range(1, n + 1), seed=7, nulls=nulls)
    write_in_batches(db, rows, seed=8)
    evals = [(run_id, s, random.Random(s).uniform(0, 3), 0.0) for s in range(0, n + 1, 50)]  # step 0: no step row
    db.executemany("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)", evals)

    four = ["loss", "lr", "grad_norm", "update_norm"]
    cases: list[tuple[list[str], int | None, int]] = [
        (["loss"], None, 1000),  # buckets of 48 steps: narrower than the rule for rollups, a scan either way
        (["loss"], None, 300),  # level-0 blocks
        (four, None, 1000),
        (list(STEP_COLUMNS), None, 2000),
        (["loss", "eval_loss"], None, 400),
        (["loss"], None, 12),  # level-1 blocks
        (four, 4095, 800),  # since a block boundary: rollups
        (four, 4100, 800),  # since inside a block: a scan
    ]
    assert_same_as_a_scan(db, run_id, cases)
    assert rollup_reads.count(True) >= 6  # the fast path was taken where it could be

    # every answer holds each series' overall extremes at the steps of their first occurrences
    body = json.loads(metrics_json(db, run_id, four, max_points=1000))
    assert len(body["steps"]) <= 1000 and body["downsampled"] is True
    assert body["steps"][0] == 1 and body["steps"][-1] == n
    for key in four:
        at = 2 + STEP_COLUMNS.index(key)
        column = [(r[at], r[1]) for r in rows if r[at] is not None]
        low, high = min(column, key=lambda c: c[0]), max(column, key=lambda c: c[0])  # the first of ties
        points = dict(zip(body["steps"], body["series"][key], strict=True))
        for value, step in (low, high):
            assert points[step] == (value if math.isfinite(value) else None)  # type: ignore[arg-type]


def test_a_live_run_is_read_from_rollups_while_its_last_block_fills(
    db: sqlite3.Connection, rollup_reads: list[bool]
) -> None:
    run_id = add_run(db)
    rows = random_rows(run_id, range(1, 9000), seed=3, nulls=True)
    cases: list[tuple[list[str], int | None, int]] = [(["loss", "grad_norm"], None, 100), (["loss"], 3999, 60)]
    written = 0
    for upto in (4007, 4008, 4100, 8999):  # each leaves the last block part-filled (4008: by a 1-row batch)
        write_in_batches(db, rows[written:upto], seed=upto)
        written = upto
        assert_same_as_a_scan(db, run_id, cases)
    assert rollup_reads.count(True) >= 5


def test_rewritten_steps_and_writers_without_rollups(db: sqlite3.Connection, rollup_reads: list[bool]) -> None:
    run_id = add_run(db)
    add_steps(db, run_id, [1.0] * 5000)
    # A resumed run writes some steps again, out of order: the rollups follow the rows that won.
    again = [step_row(run_id, s, v) for s, v in ((1300, 0.5), (1234, 9.0), (1240, 0.5), (1234, 0.5), (1299, 0.5))]
    write_steps(db, run_id, again)
    body = read_metrics(db, run_id, ["loss"], max_points=60)
    assert rollup_reads == [True]
    assert dict(zip(body.steps, body.series["loss"], strict=True))[1234] == 0.5  # the last write of step 1234
    assert min(body.series["loss"]) == 0.5 and max(body.series["loss"]) == 1.0  # type: ignore[type-var]

    # Rows written around write_steps, without their rollups: a scan, with the right answers.
    add_steps(db, run_id, [7.0, 0.25], first=5001, rollups=False)
    body = read_metrics(db, run_id, ["loss"], max_points=60)
    assert rollup_reads == [True, False]
    assert body.steps[-1] == 5002 and 7.0 in body.series["loss"] and 0.25 in body.series["loss"]
    other = add_run(db, "other")
    add_steps(db, other, [1.0] * 4901, first=100)
    add_steps(db, other, [-9.0 if s == 50 else 1.0 for s in range(1, 100)], rollups=False)  # before the first
    body = read_metrics(db, other, ["loss"], max_points=60)
    assert rollup_reads[-1] is False and min(body.series["loss"]) == -9.0  # type: ignore[type-var]


def test_rows_before_since_step_never_come_from_a_shared_block(
    db: sqlite3.Connection, rollup_reads: list[bool]
) -> None:
    run_id = add_run(db)
    losses: list[float | None] = [1.0] * 2995
    losses[-4:] = [100.0, -100.0, 100.0, -100.0]  # steps 2992..2995, in the block of 2944..3007
    add_steps(db, run_id, losses)
    add_steps(db, run_id, [1.0] * 4000, first=5001)  # a gap, then more steps
    db.execute("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, 3005, 0.5, 0.0)", (run_id,))
    cases: list[tuple[list[str], int | None, int]] = [(["loss", "eval_loss"], 2995, 150)]
    assert_same_as_a_scan(db, run_id, cases)
    assert rollup_reads[0] is False  # the first bucket starts at 2944, and that block has rows up to 2995
    body = read_metrics(db, run_id, ["loss", "eval_loss"], since_step=2995, max_points=150)
    assert body.downsampled and body.steps[0] == 3005 and {-100.0, 100.0}.isdisjoint(body.series["loss"])


def test_the_recorder_writes_rollups_with_the_rows(
    settings: Settings, db: sqlite3.Connection, rollup_reads: list[bool]
) -> None:
    from trainer.recorder import Recorder

    run_id = add_run(db)
    rows = [r[1:] for r in random_rows(run_id, range(1, 3001), seed=11, nulls=True)]
    recorder = Recorder(settings.db_path, run_id)
    for i in range(0, len(rows), 32):  # the training loop hands rows over 32 at a time
        recorder.steps(rows[i : i + 32])
    recorder.close()

    assert len(stored_steps(db, run_id)) == 3000
    written = stored_rollups(db, run_id)
    assert len(written) == (3000 // ROLLUP_BLOCKS[0] + 1) + (3000 // ROLLUP_BLOCKS[1] + 1)  # levels 0 and 1
    refresh_rollups(db, run_id)
    assert stored_rollups(db, run_id) == written  # the same as a refresh of the whole run
    assert_same_as_a_scan(db, run_id, [(["loss", "lr", "grad_norm"], None, 80)])
    assert rollup_reads[:2] == [True, True]


def stored_steps(db: sqlite3.Connection, run_id: int) -> list[int]:
    return [r[0] for r in db.execute("SELECT step FROM step_metrics WHERE run_id = ?", (run_id,))]


def test_deleting_a_run_deletes_its_rollups(settings: Settings, db: sqlite3.Connection) -> None:
    from sqlmodel import Session

    from app.services import delete_run
    from store.db import make_engine

    run_id, keep = add_run(db), add_run(db, "keep")
    add_steps(db, run_id, [1.0] * 100)
    add_steps(db, keep, [1.0] * 100)
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        delete_run(session, settings, run_id)  # foreign keys are on: rollups left behind would fail it
    engine.dispose()
    assert stored_rollups(db, run_id) == [] and len(stored_rollups(db, keep)) == 100 // ROLLUP_BLOCKS[0] + 1 + 1
