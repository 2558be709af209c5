"""Throw-away tracking servers for the `server` tests: a PostgreSQL cluster and `mlflow server` processes on it.

Everything listens on 127.0.0.1 only, on free ports, with its files in a temp dir removed at teardown:

- `postgres` (session): an `initdb` cluster run as the `postgres` system user when the tests run as root (postgres
  refuses to run as root); its unix socket lives in the cluster's own temp dir. Skips the test, with the reason,
  when the PostgreSQL binaries or psycopg are missing (`bash .ci/services.sh` installs both).
- `pg_tracking_server` (module): `mlflow server` on a fresh PostgreSQL database with proxied artifacts
  (`--artifacts-destination`), like a team's shared server.
- `auth_tracking_server` (module): the same with `--app-name basic-auth`; the admin user is the one named in the
  installed `basic_auth.ini`, with a generated password (MLflow ships none), and a second, non-admin user is
  created through the auth REST API. Both servers start side by side (`tracking_servers`).
- `start_tracking_server(postgres, root, auth=False)`: a context manager for a server of one's own.
"""

from __future__ import annotations

import configparser
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from processes import HOST, free_port, stop_process_groups, tail, wait_ready

PG_SUPERUSER = "postgres"
PG_SYSTEM_USER = "postgres"  # created by Debian's postgresql-common
SERVER_START_TIMEOUT = 120.0  # database migrations on 2 busy cores take a while


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    return Path(candidates[-1]).parent if candidates else None


# ---- PostgreSQL -------------------------------------------------------------------------------------------------
@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path  # owned by the user postgres runs as
    port: int = field(default_factory=free_port)
    _databases: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def _as_owner(self, *args: str) -> list[str]:
        cmd = [str(a) for a in args]
        return ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, *args: str) -> None:
        out = subprocess.run(self._as_owner(*args), cwd=self.root, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args[:2]))} failed ({out.returncode}): "
                               f"{out.stderr.strip() or out.stdout.strip()}\n{tail(self.log_file)}")

    def start(self) -> None:
        self._run(self.bin_dir / "initdb", "-D", self.data_dir, "-U", PG_SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses={HOST} -c unix_socket_directories='{self.root}' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(self._as_owner(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w",
                                          "stop"), cwd=self.root, capture_output=True, timeout=60)

    def uri(self, database: str) -> str:
        return f"postgresql://{PG_SUPERUSER}@{HOST}:{self.port}/{database}"

    def create_database(self, prefix: str = "mlflow") -> str:
        """A new, empty database; returns its SQLAlchemy URI."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{self._databases}"
        with psycopg.connect(host=HOST, port=self.port, user=PG_SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


def _postgres_skip_reason() -> str | None:
    if postgres_bin_dir() is None:
        return "PostgreSQL server binaries not found (initdb); `bash .ci/services.sh` installs them"
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql:// URIs)
    except ImportError:
        return "psycopg is not installed; `bash .ci/services.sh` installs psycopg[binary]"
    try:
        import flask_wtf  # noqa: F401  (mlflow server --app-name basic-auth needs it: mlflow[auth])
    except ImportError:
        return "Flask-WTF is not installed (mlflow[auth]); `bash .ci/services.sh` installs it"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no '{PG_SYSTEM_USER}' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


@contextmanager
def running_postgres():
    reason = _postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="ptqflow-pg-"))  # short path: the unix socket lives here
    if os.geteuid() == 0:
        user = pwd.getpwnam(PG_SYSTEM_USER)
        os.chown(root, user.pw_uid, user.pw_gid)
    root.chmod(0o700)
    cluster = PostgresCluster(postgres_bin_dir(), root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---- mlflow server ----------------------------------------------------------------------------------------------
@dataclass
class TrackingServer:
    url: str
    backend_uri: str
    artifacts_dir: Path
    log_file: Path
    process: subprocess.Popen
    admin_username: str | None = None  # basic auth only
    admin_password: str | None = None
    user: str | None = None  # a non-admin user created through the auth REST API
    user_password: str | None = None

    def client_env(self, username: str | None = None, password: str | None = None) -> dict[str, str]:
        """The environment for a ptqflow process that tracks to this server."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
        env.update(MLFLOW_TRACKING_URI=self.url, MLFLOW_DISABLE_TELEMETRY="true")
        if username is not None:
            env["MLFLOW_TRACKING_USERNAME"] = username
        if password is not None:
            env["MLFLOW_TRACKING_PASSWORD"] = password
        return env

    @contextmanager
    def client(self, username: str | None = None, password: str | None = None):
        """An MlflowClient for this server; with username, every request in the block sends those credentials
        (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD at each request)."""
        from mlflow.tracking import MlflowClient

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        try:
            for key, value in zip(saved, (username, password)):
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            yield MlflowClient(tracking_uri=self.url, registry_uri=self.url)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def admin_client(self):
        return self.client(self.admin_username, self.admin_password)


def _auth_config(root: Path, database_uri: str) -> tuple[Path, str]:
    """basic_auth.ini: the installed defaults with the user database moved to PostgreSQL; returns (path, admin)."""
    import mlflow  # not mlflow.server.auth: importing it needs Flask-WTF, which only the server process needs

    defaults = Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini"
    parser = configparser.ConfigParser()
    if not parser.read(defaults):
        raise RuntimeError(f"MLflow's {defaults} is missing")
    parser["mlflow"]["database_uri"] = database_uri
    # Cache good credentials for a minute (off by default): otherwise every request of a sweep pays a PBKDF2 check.
    parser["mlflow"]["auth_cache_ttl_seconds"] = "60"
    path = root / "basic_auth.ini"
    with path.open("w") as f:
        parser.write(f)
    return path, parser["mlflow"]["admin_username"]


def _create_user(url: str, admin: tuple[str, str], username: str, password: str) -> None:
    import requests

    response = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": username, "password": password},
                             auth=admin, timeout=30)
    if response.status_code != 200:
        raise RuntimeError(f"creating user {username} failed: {response.status_code} {response.text[:300]}")


@dataclass
class _Launch:
    root: Path
    auth: bool
    url: str
    backend_uri: str
    artifacts: Path
    log_file: Path
    process: subprocess.Popen
    admin_username: str | None
    admin_password: str | None


def _launch(postgres: PostgresCluster, root: Path, auth: bool) -> _Launch:
    root.mkdir(parents=True, exist_ok=True)
    backend_uri = postgres.create_database("mlflow")
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port), "--workers", "1"]
    admin_username = admin_password = None
    if auth:
        config_path, admin_username = _auth_config(root, postgres.create_database("mlflow_auth"))
        admin_password = secrets.token_urlsafe(18)
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(config_path), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))  # CSRF key the auth app requires
        cmd += ["--app-name", "basic-auth"]
    log_file = root / "mlflow-server.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return _Launch(root, auth, f"http://{HOST}:{port}", backend_uri, artifacts, log_file, process, admin_username,
                   admin_password)


def _ready(launch: _Launch) -> TrackingServer:
    wait_ready(launch.url, launch.process, launch.log_file, SERVER_START_TIMEOUT, what="mlflow server")
    server = TrackingServer(launch.url, launch.backend_uri, launch.artifacts, launch.log_file, launch.process,
                            launch.admin_username, launch.admin_password)
    if launch.auth:
        server.user, server.user_password = "ptq-user", secrets.token_urlsafe(18)
        _create_user(server.url, (server.admin_username, server.admin_password), server.user, server.user_password)
    return server


@contextmanager
def start_tracking_servers(postgres: PostgresCluster, root: Path, auth: tuple[bool, ...] = (False,)):
    """One `mlflow server` per entry of auth (True: --app-name basic-auth), each on a fresh PostgreSQL database
    with artifacts under its own dir in root; started side by side, stopped (process group) at exit."""
    launches: list[_Launch] = []
    try:
        for i, with_auth in enumerate(auth):
            launches.append(_launch(postgres, root / f"server-{i}{'-auth' if with_auth else ''}", with_auth))
        yield [_ready(launch) for launch in launches]
    finally:
        stop_process_groups([launch.process for launch in launches])


@contextmanager
def start_tracking_server(postgres: PostgresCluster, root: Path, auth: bool = False):
    """`mlflow server` on a fresh PostgreSQL database, artifacts under root; yields a TrackingServer."""
    with start_tracking_servers(postgres, root, (auth,)) as (server,):
        yield server


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres():
    with running_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tracking_servers(postgres, tmp_path_factory):
    """A plain and a basic-auth server, started side by side (each takes half a minute to migrate its database)."""
    with start_tracking_servers(postgres, tmp_path_factory.mktemp("servers"), (False, True)) as servers:
        yield servers


@pytest.fixture(scope="module")
def pg_tracking_server(tracking_servers) -> TrackingServer:
    return tracking_servers[0]


@pytest.fixture(scope="module")
def auth_tracking_server(tracking_servers) -> TrackingServer:
    return tracking_servers[1]
