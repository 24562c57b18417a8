"""The layers: app/ uses trainer/, both use store/ and analysis/, and nothing points back.

Every import in every module is read from its source (those inside functions too), so a lazy import
cannot slip past; and the server is started in a fresh process to see that torch stays out of it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_AND_WEB = {"torch", "transformers", "peft", "fastapi", "starlette", "uvicorn"}
FORBIDDEN = {
    "trainer": {"app"},
    "store": {"app", "trainer", "analysis"} | TORCH_AND_WEB,
    "analysis": {"app", "trainer", "store"} | TORCH_AND_WEB,
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package of every import in a module -> the first line importing it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    modules = sorted((REPO / layer).rglob("*.py"))
    assert modules, f"no modules in {layer}/"
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {package}"
        for path in modules
        for package, line in imported_packages(path).items()
        if package in FORBIDDEN[layer]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from app.services import create_run\n    import torch.nn\n")
    assert imported_packages(module) == {"os": 1, "app": 4, "torch": 5}


SERVER_WITHOUT_TORCH = """
import sys
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app

with TestClient(create_app(Settings(), run_jobs=False)) as client:
    for path in ("/", "/runs/new", "/api/health", "/api/models", "/api/datasets"):
        assert client.get(path).status_code == 200, path
    body = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "max_steps": 5}
    assert client.post("/api/runs", json=body).status_code == 201
    assert client.post("/api/sweeps", json={"config": body, "learning_rates": [1e-3, 1e-2]}).status_code == 201
    assert client.post("/api/runs", json={**body, "model": "no-such-model"}).status_code == 422
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")))
"""


def test_the_server_starts_validates_and_queues_runs_without_torch(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVER_WITHOUT_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
