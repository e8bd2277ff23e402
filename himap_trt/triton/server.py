"""Starting and stopping the bundled ``tritonserver`` on a model repository (``himap-trt triton serve``).

:class:`TritonServer` is what the command, the tests and the benchmark use: it sets up the Python
backend for this interpreter (:mod:`himap_trt.triton.environment`), starts the server in its own
process group, waits for ``/v2/health/ready`` and stops it (SIGTERM: Triton finishes in-flight
requests, then SIGKILL of the group after a timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from himap_trt.errors import HimapError
from himap_trt.triton.environment import find_triton, make_backend_directory, make_stub_environment, server_environment

#: ``--model-config-name`` values written by ``himap-trt triton repo`` (``<model>/configs/<name>.pbtxt``).
CONFIG_NAMES = ("cpu", "gpu")


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible (the driver's device node), without importing CUDA libraries."""
    return Path("/dev/nvidiactl").exists() and any(Path("/dev").glob("nvidia[0-9]*"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` process serving a model repository.

    Args:
        repository: the model repository (``himap-trt triton repo --out``).
        host: address the HTTP, gRPC and metrics endpoints bind to.
        http_port / grpc_port / metrics_port: their ports.
        model_config_name: ``cpu`` / ``gpu`` (``configs/<name>.pbtxt`` of each model), or None for
            each model's ``config.pbtxt``.
        log: where the server's output goes (a file object; None: inherit this process's).
        log_verbose: Triton's ``--log-verbose`` level.
        extra_args: further ``tritonserver`` arguments.

    Raises:
        HimapError: the repository is missing, or the wheel / glibc / stub is (see
            :func:`~himap_trt.triton.environment.find_triton`).
    """

    def __init__(self, repository: Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_config_name: str | None = None, log: IO | None = None,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise HimapError(f"--repository {str(repository)!r} is not a directory; write one with `himap-trt triton repo`")
        if model_config_name is not None and model_config_name not in CONFIG_NAMES:
            raise HimapError(f"--model-config-name must be one of {', '.join(CONFIG_NAMES)}, got {model_config_name!r}")
        self.install = find_triton()
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_config_name = model_config_name
        self.log = log
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self._backends: tempfile.TemporaryDirectory | None = None

    # -- addresses ------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient's form)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_directory: Path) -> list[str]:
        """The ``tritonserver`` command line."""
        args = [str(self.install.server), f"--model-repository={self.repository}",
                f"--backend-directory={backend_directory}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--allow-gpu-metrics={'true' if gpu_visible() else 'false'}",
                f"--log-verbose={self.log_verbose}"]
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        return args + list(self.extra_args)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (returns at once; see :meth:`wait_ready`)."""
        if self.process is not None:
            raise RuntimeError("the server was already started")
        self._backends = tempfile.TemporaryDirectory(prefix="himap-trt-triton-")
        backends = make_backend_directory(self.install, Path(self._backends.name) / "backends")
        stub_bin = make_stub_environment(self.install, Path(self._backends.name) / "stub-env")
        self.process = subprocess.Popen(self.command(backends), env=server_environment(self.install, stub_bin),
                                        stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 (every model loaded)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Wait until the server is ready.

        Returns:
            Seconds from now until ready.

        Raises:
            HimapError: the server exited first, or was not ready within ``timeout_s`` seconds
                (it is then stopped).
        """
        if self.process is None:
            raise RuntimeError("start the server first")
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise HimapError(f"tritonserver exited with status {code} before it was ready "
                                 f"(repository {self.repository}); its log above/in the log file says why")
            if self.ready():
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout_s:
                self.stop()
                raise HimapError(f"tritonserver was not ready after {timeout_s:.0f} s (repository {self.repository})")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (in-flight requests finish), then SIGKILL of the process group after ``timeout_s``.

        Returns:
            The server's exit status (None if it was not started).
        """
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            code = self.process.returncode
            # stubs normally exit with the server; make sure none outlives it
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._backends is not None:
            self._backends.cleanup()
            self._backends = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
