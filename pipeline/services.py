"""`python -m pipeline.services up|down|status [overrides]`: the shared services of a team setup.

``up`` creates the Optuna and MLflow databases in an existing PostgreSQL (if absent), starts an MLflow
tracking server on them (artifacts proxied by the server) in the background, waits until it answers,
and prints the overrides every worker gets. ``down`` stops the server it started; ``status`` says what
answers. Settings: conf/services.yaml (overrides ``services.<key>=<value>``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import requests
from omegaconf import DictConfig, OmegaConf
from psycopg import sql
from sqlalchemy.engine import make_url

from pipeline.cli import guard
from pipeline.tracking import REPO

ACTIONS = ("up", "down", "status")


def load_config(overrides: list[str]) -> DictConfig:
    """conf/services.yaml with ``services.<key>=<value>`` overrides; an unknown key is an error."""
    cfg = OmegaConf.load(REPO / "conf" / "services.yaml")
    OmegaConf.set_struct(cfg, True)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides are key=value (e.g. services.mlflow.port=5001), got {bad}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def _under_repo(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else REPO / path


def database_url(admin_url: str, database: str, driver: str = "postgresql+psycopg") -> str:
    """The admin URL pointed at ``database`` through ``driver`` (SQLAlchemy's form, for Optuna and MLflow)."""
    return make_url(admin_url).set(drivername=driver, database=database).render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    """A URL psycopg connects with (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_databases(admin_url: str, names: list[str]) -> list[str]:
    """Create each database that does not exist yet; return the ones created."""
    try:
        conn = psycopg.connect(_libpq(admin_url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        where = make_url(admin_url).render_as_string(hide_password=True)
        raise ConnectionError(
            f"PostgreSQL at {where} does not answer or refuses the login ({' '.join(str(e).split())}); "
            f"install and start one (apt-get install postgresql) or set services.postgres=postgresql://user@host:port/db"
        ) from e
    created = []
    with conn:
        for name in names:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
                except psycopg.errors.DuplicateDatabase:
                    pass  # another `up` created it between the look and the create
    return created


def server_command(cfg: DictConfig) -> list[str]:
    mlflow_cfg = cfg.services.mlflow
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        database_url(cfg.services.postgres, cfg.services.mlflow_db),
        "--serve-artifacts",
        "--artifacts-destination",
        str(_under_repo(mlflow_cfg.artifacts).resolve()),
        "--host",
        str(mlflow_cfg.host),
        "--port",
        str(mlflow_cfg.port),
        "--workers",
        "1",
    ]
    if mlflow_cfg.allowed_hosts:
        cmd += ["--allowed-hosts", str(mlflow_cfg.allowed_hosts)]
    return cmd + [str(arg) for arg in mlflow_cfg.extra_args]


def server_url(cfg: DictConfig) -> str:
    host = str(cfg.services.mlflow.host)
    shown = os.uname().nodename if host in ("0.0.0.0", "::") else host  # what another machine dials
    return f"http://{shown}:{cfg.services.mlflow.port}"


def local_url(cfg: DictConfig) -> str:
    """The server's URL from this machine (a wildcard bind answers on the loopback)."""
    if str(cfg.services.mlflow.host) in ("0.0.0.0", "::"):
        return f"http://127.0.0.1:{cfg.services.mlflow.port}"
    return server_url(cfg)


def answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False


def _pid(state: Path) -> int | None:
    """The pid of the server this command started, if it still runs."""
    pid_file = state / "mlflow.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pid_file.unlink()
        return None
    return pid


def worker_overrides(cfg: DictConfig) -> list[str]:
    """What each worker adds to its command line to join the shared stores."""
    return [
        f"tune.storage={database_url(cfg.services.postgres, cfg.services.optuna_db)}",
        f"tracking.uri={server_url(cfg)}",
    ]


def up(cfg: DictConfig) -> list[str]:
    """Databases, then the server (unless it already answers); return the workers' overrides."""
    state = _under_repo(cfg.services.state_dir)
    created = ensure_databases(cfg.services.postgres, [cfg.services.optuna_db, cfg.services.mlflow_db])
    print(f"databases: {cfg.services.optuna_db}, {cfg.services.mlflow_db}; created now: {created or 'none'}")
    url = local_url(cfg)
    if answers(url):
        print(f"mlflow server: already answers at {url}")
    else:
        state.mkdir(parents=True, exist_ok=True)
        _under_repo(cfg.services.mlflow.artifacts).mkdir(parents=True, exist_ok=True)
        # Without it the 3.17 server also starts job workers (~2 GB more); we run none.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(state / "mlflow.log", "ab") as server_log:
            server = subprocess.Popen(
                server_command(cfg), stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        (state / "mlflow.pid").write_text(str(server.pid))
        deadline = time.monotonic() + float(cfg.services.mlflow.ready_timeout_s)
        while not answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server.pid)
                (state / "mlflow.pid").unlink(missing_ok=True)
                tail = (state / "mlflow.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise ConnectionError(f"the MLflow server did not come up at {url}: {' | '.join(tail)}")
            time.sleep(0.5)
        print(f"mlflow server: {url} (pid {server.pid}, log {state / 'mlflow.log'})")
    overrides = worker_overrides(cfg)
    print("each worker adds: " + " ".join(overrides))
    return overrides


def _stop(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group (it started its own: the server and its worker), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child (a test's): no zombie
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def down(cfg: DictConfig) -> None:
    state = _under_repo(cfg.services.state_dir)
    pid = _pid(state)
    if pid is None:
        print("mlflow server: none started by pipeline.services (PostgreSQL is left running)")
        return
    _stop(pid)
    (state / "mlflow.pid").unlink(missing_ok=True)
    print(f"mlflow server: stopped (pid {pid}); PostgreSQL and its databases are left as they are")


def status(cfg: DictConfig) -> bool:
    """Print what answers; True when both services do."""
    try:
        ensure_databases(cfg.services.postgres, [])
        postgres_ok = True
    except ConnectionError as e:
        print(f"postgresql: {e}")
        postgres_ok = False
    else:
        print(f"postgresql: answers at {make_url(cfg.services.postgres).render_as_string(hide_password=True)}")
    url = server_url(cfg)
    server_ok = answers(local_url(cfg))
    pid = _pid(_under_repo(cfg.services.state_dir))
    print(f"mlflow server: {'answers' if server_ok else 'does not answer'} at {url}" + (f" (pid {pid})" if pid else ""))
    if postgres_ok and server_ok:
        print("each worker adds: " + " ".join(worker_overrides(cfg)))
    return postgres_ok and server_ok


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        raise ValueError(f"give an action first: python -m pipeline.services {'|'.join(ACTIONS)} [overrides]")
    cfg = load_config(argv[1:])
    if argv[0] == "up":
        up(cfg)
    elif argv[0] == "down":
        down(cfg)
    else:
        return 0 if status(cfg) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    raise SystemExit(guard(lambda: _main(argv), argv))


if __name__ == "__main__":
    main()
