"""Where a study lives: the storage URL, a storage that survives a database restart, and a lock that
makes creating a study (and its parent run and preset trial) race-free across processes and machines.

- ``sqlite:///<path>``: one machine (a relative path is under the repository, like mlruns/).
- ``postgresql://<user>[:<password>]@<host>:<port>/<database>``: workers on any number of machines
  (the psycopg 3 driver; ``postgresql+psycopg://`` is the same). Other databases are refused.

The storage is checked to answer when it is opened (``tune.connect_timeout_s``); afterwards, on
PostgreSQL, a call that fails because the database went away (a restart, a dropped connection) is retried
with backoff for up to ``tune.storage_retry_s`` seconds, on a fresh connection (pool pre-ping), before the
error is raised. sqlite calls are not retried.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any

import filelock
import optuna
import sqlalchemy

from pipeline.cli import one_line
from pipeline.tracking import REPO

log = logging.getLogger("pipeline.tune")
# Errors of a connection, not of a statement: the server went away, restarts, or refuses for now.
CONNECTION_ERRORS = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
# Every storage call a study, a trial or the heartbeat thread makes (optuna's BaseStorage/BaseHeartbeat).
_CALLS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "_get_trials",
    "record_heartbeat",
    "_get_stale_trial_ids",
)


def storage_url(url: str) -> str:
    """The SQLAlchemy URL of a ``tune.storage`` setting (see the module's docstring)."""
    if url.startswith("sqlite:///"):
        return f"sqlite:///{REPO / url.removeprefix('sqlite:///')}"
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    if url.startswith("postgresql+psycopg://"):
        return url
    raise ValueError(
        f"tune.storage {url!r}: give sqlite:///<path> (one machine) or "
        f"postgresql://<user>@<host>:<port>/<database> (workers on several machines)"
    )


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def _connection_lost(error: BaseException) -> bool:
    """A connection error, raised as is or wrapped by optuna (which turns every SQLAlchemy error inside a
    session into a StorageInternalError)."""
    if isinstance(error, optuna.exceptions.StorageInternalError):
        error = error.__cause__
    return isinstance(error, CONNECTION_ERRORS)


def _retry_or_raise(name: str, error: Exception, deadline: float, wait: float) -> float:
    """Sleep ``wait`` and return the next wait if ``error`` is a lost connection and time is left; else raise."""
    if not _connection_lost(error) or time.monotonic() + wait > deadline:
        raise error
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
    log.warning("storage call %s lost its connection (%s); retrying in %.2f s", name, one_line(cause), wait)
    time.sleep(wait)
    return min(2 * wait, 4.0)


def _retrying(name: str) -> Callable:
    call = getattr(optuna.storages.RDBStorage, name)

    @wraps(call)
    def retried(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        deadline, wait = time.monotonic() + self.retry_s, 0.25
        while True:
            try:
                return call(self, *args, **kwargs)
            except (*CONNECTION_ERRORS, optuna.exceptions.StorageInternalError) as e:
                wait = _retry_or_raise(name, e, deadline, wait)

    return retried


class RetryingStorage(optuna.storages.RDBStorage):
    """optuna's RDBStorage whose calls outlive a database restart: a call that loses its connection is
    retried (bounded, with backoff) on a new one.

    A retried write that had in fact been committed before its connection dropped is recognised where
    it matters for counting: a trial's final state (``set_trial_state_values``). A ``create_new_trial``
    whose commit reply was lost would leave one extra RUNNING trial without a heartbeat (not seen in the
    restart tests; the window is the instant between the commit and its reply).
    """

    def __init__(self, url: str, *, retry_s: float, **kwargs: Any) -> None:
        self.retry_s = retry_s
        super().__init__(url, **kwargs)

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState, values: Any = None) -> bool:
        deadline, wait, attempt = time.monotonic() + self.retry_s, 0.25, 0
        while True:
            try:
                return super().set_trial_state_values(trial_id, state, values)
            except (*CONNECTION_ERRORS, optuna.exceptions.StorageInternalError) as e:
                wait, attempt = _retry_or_raise("set_trial_state_values", e, deadline, wait), attempt + 1
            except optuna.exceptions.UpdateFinishedTrialError:
                stored = self.get_trial(trial_id)
                if attempt and stored.state == state and (values is None or list(stored.values or []) == list(values)):
                    return True  # our own write, committed before the connection dropped
                raise


for _name in _CALLS:
    setattr(RetryingStorage, _name, _retrying(_name))


def open_storage(setting: str, *, connect_timeout_s: int, retry_s: float, **heartbeat: Any) -> RetryingStorage:
    """The study storage of a ``tune.storage`` setting, checked to answer now: a bad URL, host, port,
    user, password or database is an error before any study or trial is touched."""
    url = storage_url(setting)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        (REPO / url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        retry_s = 0.0  # a local file has no restart to outlive; a locked database fails as before
    else:
        # pre-ping: a pooled connection that a database restart closed is replaced, not used
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": connect_timeout_s}}
    try:
        with _tables_lock(url, engine_kwargs):
            return RetryingStorage(url, engine_kwargs=engine_kwargs, retry_s=retry_s, **heartbeat)
    except CONNECTION_ERRORS as e:
        reason = one_line(e.orig) if e.orig is not None else one_line(e)
        raise ConnectionError(
            f"tune.storage {shown(url)} does not answer or refuses the connection ({reason}); "
            f"check its host, port, user, password and database"
        ) from None


@contextmanager
def _tables_lock(url: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """Held while optuna creates or upgrades its tables in a new database: workers that start together
    on it would otherwise run the same migration at once, and all but one fail."""
    if url.startswith("sqlite:///"):
        with filelock.FileLock(url.removeprefix("sqlite:///") + ".lock"):
            yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **engine_kwargs)
    try:
        with _advisory_lock(engine, "pipeline.tune:tables"):
            yield
    finally:
        engine.dispose()


@contextmanager
def _advisory_lock(engine: sqlalchemy.engine.Engine, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock named ``name``: the server drops it if its holder dies."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})


@contextmanager
def study_lock(store: optuna.storages.RDBStorage, name: str) -> Iterator[None]:
    """Held while a study, its parent run and its preset trial are created and while a worker takes its
    rank: processes on any machine that open one study at the same instant do so one after the other.

    PostgreSQL: a session advisory lock (the server drops it if its holder dies); sqlite: a file lock
    beside the database file.
    """
    if store.engine.dialect.name != "postgresql":
        with filelock.FileLock(f"{store.engine.url.database}.lock"):
            yield
        return
    with _advisory_lock(store.engine, f"pipeline.tune:study:{name}"):
        yield
