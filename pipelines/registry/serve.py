"""`ptqflow serve`: a registered model behind MLflow's own scoring server, but only the file ptqflow verified.

`mlflow models serve -m models:/NAME@ALIAS` loads TorchScript (loading runs code) without checking it against the
version's `sha256` tag, and under whatever torch quantized engine is the default. Here the version is downloaded
and SHA-256-checked by `ptqflow.pipelines.registry.pull.pull`, its MLmodel is checked to load exactly that file, torch's quantized
engine is set from the version's `quantized_engine` tag, and only then is the local copy loaded with
`mlflow.pyfunc.load_model` and served in this process by `mlflow.pyfunc.scoring_server` on uvicorn, as `mlflow models
serve --env-manager local` does (same REST API: /ping, /health, /version, /invocations), with one worker, so the
engine setting and the verified file are what answer requests.
"""

from __future__ import annotations

import errno
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ptqflow.common.errors import ConfigError, IntegrityError, ModelError, first_line

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
PYTORCH_LOADER = "mlflow.pytorch"
ONNX_LOADER = "mlflow.onnx"
PYTORCH_PICKLE_MODULE = "mlflow.pytorch.pickle_module"  # what mlflow.pytorch.save_model records


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    model_dir: Path  # the downloaded MLflow model directory that is served
    model_file: Path  # the SHA-256-verified file inside it
    sha256: str
    engine: str | None  # torch quantized engine set before loading (None: TorchScript-free or untagged)
    pyfunc: object  # mlflow.pyfunc.PyFuncModel
    # the version's batch-1 threads: onnxruntime's come from the MLmodel's session options, torch's are set by pull
    threads: int | None = None


def model_ref(ref: str, version: str | None, alias: str | None) -> tuple[str, str | None, str | None]:
    """NAME@ALIAS / NAME/N / NAME --version N / NAME --alias A → (name, version, alias), with the same checks as
    pull, and exactly one of a version or an alias."""
    from ptqflow.pipelines.shared.names import version_ref

    named = version_ref(ref, version, alias)
    if (named.version is None) == (named.alias is None):
        raise ConfigError("give exactly one of --version or an alias (NAME@ALIAS or --alias)")
    return named.name, named.version, named.alias


def bind(host: str, port: int) -> socket.socket:
    """Reserve host:port now (bound, not yet listening: connections are refused until serving starts), so a port
    in use is one clear error before anything is downloaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address to listen on ({exc})") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listening port still refuses
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}; pick another --port or --host") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_model_dir(model_dir: Path, model_file: Path) -> str:
    """The MLmodel in `model_dir` must load `model_file` (the verified one) with MLflow's own pytorch or onnx loader,
    and nothing else: no code directory, no other data path, no other pickle module. Returns the loader module."""
    from mlflow.models import Model

    mlmodel = model_dir / "MLmodel"
    try:
        conf = Model.load(str(mlmodel)).flavors.get("python_function")
    except Exception as exc:  # a missing or mangled MLmodel: YAML, OSError, MlflowException
        raise IntegrityError(f"{mlmodel} cannot be read ({type(exc).__name__}); refusing to serve") from exc
    expected = ONNX_LOADER if model_file.suffix == ".onnx" else PYTORCH_LOADER
    if not conf or conf.get("loader_module") != expected:
        loader = conf.get("loader_module") if conf else None
        raise IntegrityError(f"{mlmodel} loads the model with {loader!r}, not {expected}; refusing to serve")
    if conf.get("code"):
        raise IntegrityError(f"{mlmodel} adds a code directory ({conf['code']!r}); refusing to serve")
    data = (model_dir / str(conf.get("data", ""))).resolve()
    loaded = data / "model.pth" if expected == PYTORCH_LOADER and data.is_dir() else data
    if loaded != model_file.resolve():
        raise IntegrityError(f"{mlmodel} loads {loaded}, not the verified {model_file}; refusing to serve")
    if expected == PYTORCH_LOADER:
        info = data / "pickle_module_info.txt"
        recorded = info.read_text().strip() if info.is_file() else None
        if recorded != PYTORCH_PICKLE_MODULE:
            raise IntegrityError(f"{info} names pickle module {recorded!r}, not {PYTORCH_PICKLE_MODULE}; "
                                 "refusing to serve")
    return expected


def load_verified(name: str, version: str | None, alias: str | None, download_dir: Path) -> ServedModel:
    """Download and verify (pull), set the version's quantized engine, then load the local MLflow model."""
    import mlflow

    from ptqflow.models.runtime.allocator import reuse_freed_memory
    from ptqflow.models.runtime.runners import set_quantized_engine
    from ptqflow.pipelines.registry.pull import pull

    pulled = pull(name, version, alias, download_dir)  # SHA-256 checked before anything loads it
    check_model_dir(pulled.model_dir, pulled.model_file)
    if pulled.model_file.suffix != ".onnx":  # pull checked that this torch has the engine
        set_quantized_engine(pulled.engine)  # before the pyfunc loader's torch.jit.load: weights are packed for it
        reuse_freed_memory()  # as TorchRunner runs it, and as its latency was measured
    try:
        pyfunc = mlflow.pyfunc.load_model(str(pulled.model_dir))
    except mlflow.exceptions.MlflowException as exc:
        raise ModelError(f"{name} version {pulled.version}: MLflow cannot load the verified model: "
                         f"{first_line(exc.message)}") from exc
    return ServedModel(name, pulled.version, pulled.model_dir, pulled.model_file, pulled.sha256, pulled.engine,
                       pyfunc, pulled.latency_threads)


def scoring_app(model: ServedModel):
    """MLflow's scoring server app (FastAPI) for the loaded model, as `mlflow models serve` builds it."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(model.pyfunc)


def run_server(app, sock: socket.socket, log_level: str = "info") -> str | None:
    """Serve `app` on the bound `sock` in this process until SIGINT/SIGTERM; returns the stopping signal's name."""
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising the stop signal after its graceful shutdown: stopping a server is its
        normal end here, not an interruption of ptqflow's work."""

        stop_signal: str | None = None

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            self.stop_signal = self.stop_signal or signal.Signals(sig).name
            super().handle_exit(sig, frame)

    host, port = sock.getsockname()[:2]
    server = Server(uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return server.stop_signal


def _runtime_of(model: ServedModel) -> str:
    threads = f", {model.threads} thread{'s' if model.threads > 1 else ''}" if model.threads else ""
    if model.model_file.suffix == ".onnx":
        return f"onnxruntime{threads}"
    if model.engine:
        return f"torch quantized engine {model.engine}{threads}"
    import torch

    return f"torch quantized engine {torch.backends.quantized.engine} (the version has no quantized_engine tag)"


@contextmanager
def download_dir(output: Path | None) -> Iterator[Path]:
    """`output` (kept), or a temp dir removed when serving ends."""
    if output is not None:
        yield output
        return
    with tempfile.TemporaryDirectory(prefix="ptqflow-serve-") as tmp:
        yield Path(tmp)


def serve(ref: str, version: str | None, alias: str | None, host: str, port: int, output: Path | None,
          announce: Callable[[str], None] = print) -> str | None:
    """`ptqflow serve`: reserve the port, download + verify + load under the version's engine, announce, serve.
    Returns the name of the signal that stopped the server."""
    name, version, alias = model_ref(ref, version, alias)
    sock = bind(host, port)
    try:
        with download_dir(output) as directory:
            model = load_verified(name, version, alias, directory)
            app = scoring_app(model)
            from ptqflow.common.interrupts import checkpoint

            checkpoint()  # a Ctrl-C while loading stops here, before anything listens
            announce(f"serving {name} version {model.version} at {url_of(sock)} (sha256 {model.sha256[:12]}…, "
                     f"verified; {_runtime_of(model)}); POST /invocations, Ctrl-C stops")
            return run_server(app, sock)
    finally:
        sock.close()
