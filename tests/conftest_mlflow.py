"""Real MLflow tracking servers on loopback (SQLite, and PostgreSQL where the machine has it), and trained
pipeline states to register in them."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from conftest_split import make_split, tiny_params

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_env(**extra: str) -> dict:
    """The environment for the project's command-line tools (mlflow, uvicorn, braintumor) as subprocesses."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).ok:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(args: list[str], health: str, log: Path, env: dict | None = None):
    """Run a server process until the block ends; yields once `health` answers."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env or tool_env(), start_new_session=True
        )
    try:
        wait_for(health, process, log)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        process.wait(timeout=30)


@contextlib.contextmanager
def tracking_server(root: Path, backend_store: str):
    """`mlflow server` on a free loopback port, artifacts served by the server; yields its URL."""
    port = free_port()
    args = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store,
        "--artifacts-destination",
        (root / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with serving(args, f"http://127.0.0.1:{port}/health", root / "server.log"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL cluster on a free port (run as the `postgres` user when we are root); yields a
    SQLAlchemy URI. Skips when the machine has no PostgreSQL. Its folder is a fresh one under the system temp
    folder, since pytest's own (mode 700, owned by root) is closed to the postgres user."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="braintumor-pg-"))
    data = root / "pgdata"
    data.mkdir()
    if as_user:
        for path in (root, data):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()
    subprocess.run(
        as_user + [initdb, "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_user
        + [
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "postgres.log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            as_user + ["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def trained_state(root: Path, model: str, split: Path, **train_params) -> tuple[Path, dict]:
    """A workspace holding a real pipeline state (split, trained and evaluated `model`) and its params."""
    from braintumor.evaluation import evaluate
    from braintumor.training import train

    root.mkdir(parents=True)
    shutil.copytree(split, root / "artifacts/split")
    params = tiny_params(model, **train_params)
    params["register"].update(min_recall=0.0, min_accuracy=0.0, min_specificity=0.0)
    with contextlib.chdir(root):
        train(params)
        evaluate(params)
    return root, params


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) for the whole session; yields its URL."""
    with tracking_server(
        tmp_path_factory.mktemp("mlflow-server"),
        "sqlite:///" + str(tmp_path_factory.getbasetemp() / "mlflow-server.db"),
    ) as url:
        yield url


@pytest.fixture(scope="session")
def trained_states(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Two variants trained and evaluated on the same tiny split: {"seed_fsm": (workspace, params), ...}."""
    root = tmp_path_factory.mktemp("states")
    split = make_split(root / "split")
    return {model: trained_state(root / model, model, split, epochs=6) for model in ("seed_fsm", "seed_cnn")}
