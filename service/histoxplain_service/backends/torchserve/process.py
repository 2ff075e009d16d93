"""Start, drive and stop a local TorchServe on loopback (``make serve`` and the test fixtures).

Each :class:`TorchServeProcess` owns a working directory: its derived ``config.properties``
(the packaged ``config.properties`` beside this module with free ports), ``key_file.json`` (TorchServe
writes it into its working directory), ``tmp/`` (TMPDIR/TEMP: pid file and sockets, so two
instances never see each other), ``logs/`` (LOG_LOCATION/METRICS_LOCATION) and
``torchserve.out`` (stdout and stderr of the launcher and Java; never a pipe: Java inherits it
and a reader that waits for EOF hangs).

    with TorchServeProcess(model_store, work_dir) as server:
        server.register_model("efficientnet-lite0-imagenet.mar", batch_size=4, max_batch_delay_ms=50)
        backend = TorchServeBackend(TorchServeConfig(target=server.grpc_target,
                                                     model_name=..., key_file=server.key_file))

Why one module of about 450 lines: one class owns one TorchServe's whole life (derived
configuration, start, readiness, registration, keys, stop) and its parts share that state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from histoxplain_model.errors import DependencyUnavailable
from histoxplain_service.backends.torchserve import guard

__all__ = [
    "DEFAULT_TS_CONFIG",
    "TorchServeKeys",
    "TorchServePorts",
    "TorchServeProcess",
    "read_key_file",
]

logger = logging.getLogger(__name__)

#: The committed TorchServe configuration (loopback only, token authorization on).
DEFAULT_TS_CONFIG = Path(__file__).resolve().parent / "config.properties"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TorchServePorts:
    """The five TorchServe listeners; all bind to 127.0.0.1."""

    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    @classmethod
    def free(cls) -> TorchServePorts:
        """Five ports the kernel reports free right now (a small race remains, as with any port 0)."""
        sockets = []
        try:
            for _ in range(5):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((LOOPBACK, 0))
                sockets.append(sock)
            return cls(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()


@dataclass(frozen=True)
class TorchServeKeys:
    """The keys of TorchServe's ``key_file.json`` (token authorization)."""

    inference: str
    management: str
    api: str


def read_key_file(path: Path) -> TorchServeKeys:
    """Parse TorchServe's ``key_file.json`` (``{"inference": {"key": ...}, "management": ..., "API": ...}``)."""
    try:
        content = json.loads(Path(path).read_text())
        return TorchServeKeys(
            inference=content["inference"]["key"],
            management=content["management"]["key"],
            api=content["API"]["key"],
        )
    except FileNotFoundError as error:
        raise DependencyUnavailable(
            f"TorchServe key file {path} does not exist; is TorchServe running with that working directory?"
        ) from error
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise DependencyUnavailable(f"TorchServe key file {path} is incomplete or not JSON: {error}") from error


def _config_text(template: Path, ports: TorchServePorts) -> str:
    """The template with every listener on loopback at the given ports (other lines unchanged)."""
    overrides = {
        "inference_address": f"http://{LOOPBACK}:{ports.inference}",
        "management_address": f"http://{LOOPBACK}:{ports.management}",
        "metrics_address": f"http://{LOOPBACK}:{ports.metrics}",
        "grpc_inference_address": LOOPBACK,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_address": LOOPBACK,
        "grpc_management_port": str(ports.grpc_management),
    }
    lines = []
    for line in template.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and key in overrides:
            line = f"{key}={overrides.pop(key)}"
        lines.append(line)
    lines.extend(f"{key}={value}" for key, value in overrides.items())
    return "\n".join(lines) + "\n"


class TorchServeProcess:
    """One TorchServe instance on loopback, started and stopped by this process.

    Args:
        model_store: folder with the ``.mar`` archives to register.
        work_dir: this instance's own folder (created; config, key file, logs, tmp).
        ts_config: the configuration template (default: the packaged ``config.properties`` beside this module).
        ports: fixed ports; default: free ones.
        refresh_keys: regenerate the inference and management keys (TorchServe's ``/token``
            API, with the API key) every half ``token_expiration_min``, so a long-running
            ``make serve`` keeps working; clients re-read ``key_file.json`` when it changes.
        stop_grace_s: how long TorchServe may drain on stop before it is killed.

    TorchServe runs under :mod:`.guard`, so it stops when this process dies, however it dies.
    """

    def __init__(
        self,
        model_store: Path,
        work_dir: Path,
        ts_config: Path = DEFAULT_TS_CONFIG,
        ports: TorchServePorts | None = None,
        refresh_keys: bool = True,
        stop_grace_s: float = 30.0,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.ts_config_template = Path(ts_config)
        self.ports = ports or TorchServePorts.free()
        self.refresh_keys_enabled = refresh_keys
        self.stop_grace_s = stop_grace_s
        self._launcher: subprocess.Popen[bytes] | None = None
        self._refresher: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC inference API."""
        return f"{LOOPBACK}:{self.ports.grpc_inference}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.management}"

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.inference}"

    @property
    def key_file(self) -> Path:
        """``key_file.json``, written by TorchServe into its working directory."""
        return self.work_dir / "key_file.json"

    @property
    def config_file(self) -> Path:
        return self.work_dir / "config.properties"

    @property
    def log_file(self) -> Path:
        """stdout and stderr of the launcher, Java and the Python workers."""
        return self.work_dir / "torchserve.out"

    @property
    def pid(self) -> int | None:
        """Process id of the root of this TorchServe's process tree (its guard), while started."""
        return None if self._launcher is None else self._launcher.pid

    @property
    def running(self) -> bool:
        return self._launcher is not None and self._launcher.poll() is None

    @property
    def exit_code(self) -> int | None:
        """Exit status of the TorchServe this object started, once it has exited by itself."""
        return None if self._launcher is None else self._launcher.poll()

    def keys(self) -> TorchServeKeys:
        return read_key_file(self.key_file)

    # -- life cycle --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TS_CONFIG_FILE", None)  # it would silently override --ts-config
        tmp = self.work_dir / "tmp"
        logs = self.work_dir / "logs"
        env.update(
            TMPDIR=str(tmp),
            TEMP=str(tmp),
            LOG_LOCATION=str(logs),
            METRICS_LOCATION=str(logs),
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        )
        return env

    def _torchserve_command(self, *args: str) -> list[str]:
        executable = Path(sys.executable).with_name("torchserve")
        if not executable.exists():
            found = shutil.which("torchserve")
            if found is None:
                raise DependencyUnavailable("the torchserve command is not installed (pip install torchserve)")
            executable = Path(found)
        return [str(executable), *args]

    def start(self, timeout: float = 120.0) -> None:
        """Start TorchServe and wait until its management API answers with the management key."""
        if self.running:
            raise RuntimeError("this TorchServe instance is already running")
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise DependencyUnavailable("TorchServe needs Java 17 (install openjdk-17-jre-headless)")
        for folder in (self.work_dir, self.work_dir / "tmp", self.work_dir / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self.config_file.write_text(_config_text(self.ts_config_template, self.ports))
        command = self._torchserve_command(
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(self.config_file),
            "--model-store",
            str(self.model_store),
        )
        logger.info("starting TorchServe: %s (log %s)", " ".join(command), self.log_file)
        # The guard stops TorchServe's whole process tree when this process dies, even by SIGKILL.
        guarded = [sys.executable, "-m", guard.__name__, str(self.stop_grace_s), *command]
        with self.log_file.open("ab") as log:
            self._launcher = subprocess.Popen(
                guarded,
                cwd=self.work_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches serve, which stops it in order
            )
        try:
            self._wait_management(timeout)
        except BaseException:
            self.stop()
            raise
        if self.refresh_keys_enabled and (self._refresher is None or not self._refresher.is_alive()):
            self._stopping.clear()
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="torchserve-key-refresh", daemon=True
            )
            self._refresher.start()

    def refresh_keys(self, kinds: tuple[str, ...] = ("inference", "management")) -> None:
        """Regenerate keys through the token API; TorchServe rewrites ``key_file.json``."""
        api_key = self.keys().api
        for kind in kinds:
            request = urllib.request.Request(
                f"{self.management_url}/token?type={kind}", headers={"Authorization": f"Bearer {api_key}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10.0):
                    pass
            except (urllib.error.URLError, OSError) as error:
                raise DependencyUnavailable(f"TorchServe token API failed for {kind} key: {error}") from error

    def _refresh_loop(self) -> None:
        interval = _token_expiration_min(self.config_file) * 60.0 / 2
        while not self._stopping.wait(interval):
            try:
                self.refresh_keys()
                logger.info("TorchServe keys regenerated (next in %.0f s)", interval)
            except DependencyUnavailable as error:
                logger.warning("could not regenerate TorchServe keys: %s", error)

    def _wait_management(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no key file yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise DependencyUnavailable(
                    f"TorchServe exited during start-up (status {self._launcher.returncode}); see {self.log_file}"
                )
            if self.key_file.exists():
                try:
                    self._management("GET", "/models", timeout=5.0)
                    # The gRPC listeners open a moment after the REST ones.
                    with socket.create_connection((LOOPBACK, self.ports.grpc_inference), timeout=1.0):
                        return
                except (DependencyUnavailable, OSError) as error:
                    last_error = str(error)
            time.sleep(0.25)
        raise DependencyUnavailable(
            f"TorchServe did not answer within {timeout:.0f} s ({last_error}); see {self.log_file}"
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the TorchServe this object started: SIGTERM to its guard, which drains the
        launcher's process group (SIGKILL after ``stop_grace_s``); SIGKILL to the guard itself
        if it has not exited after ``timeout``."""
        self._stopping.set()
        if self._refresher is not None:
            self._refresher.join(timeout=15)
            self._refresher = None
        guarded, self._launcher = self._launcher, None
        if guarded is None:
            return
        try:
            if guarded.poll() is None:
                guarded.send_signal(signal.SIGTERM)
                guarded.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.error("TorchServe's guard did not stop within %.0f s; killing it", timeout)
            guarded.kill()
            guarded.wait(timeout=10)
        finally:
            self.key_file.unlink(missing_ok=True)

    def __enter__(self) -> TorchServeProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- models ------------------------------------------------------------------------------

    def register_model(
        self,
        mar: str,
        model_name: str | None = None,
        batch_size: int = 1,
        max_batch_delay_ms: int = 50,
        workers: int = 1,
        response_timeout_s: int = 120,
        timeout: float = 300.0,
    ) -> str:
        """Register ``mar`` (a file name in the model store) and wait until a worker is READY.

        Returns the model name (default: the archive's name without ``.mar``).
        """
        if batch_size < 1 or max_batch_delay_ms < 0 or workers < 1:
            raise ValueError("batch_size and workers must be >= 1, max_batch_delay_ms >= 0")
        if not (self.model_store / mar).is_file():
            raise FileNotFoundError(f"{mar} is not in the model store {self.model_store}")
        name = model_name or mar.removesuffix(".mar")
        query = urllib.parse.urlencode(
            {
                "url": mar,
                "model_name": name,
                "batch_size": batch_size,
                "max_batch_delay": max_batch_delay_ms,
                "initial_workers": workers,
                "response_timeout": response_timeout_s,
                "synchronous": "true",
            }
        )
        self._management("POST", f"/models?{query}", timeout=timeout)
        self.wait_model_ready(name, timeout=timeout)
        return name

    def model_status(self, model_name: str) -> list[dict]:
        """The management API's description of ``model_name`` (one entry per version)."""
        return json.loads(self._management("GET", f"/models/{urllib.parse.quote(model_name)}", timeout=10.0))

    def wait_model_ready(self, model_name: str, timeout: float = 300.0) -> None:
        """Poll ``GET /models/{name}`` until a worker is READY (``/ping`` is healthy earlier)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise DependencyUnavailable(f"TorchServe exited; see {self.log_file}")
            try:
                versions = self.model_status(model_name)
            except DependencyUnavailable:
                versions = []
            workers = [worker for version in versions for worker in version.get("workers", [])]
            if any(worker.get("status") == "READY" for worker in workers):
                return
            time.sleep(0.25)
        raise DependencyUnavailable(
            f"model {model_name!r} has no READY worker after {timeout:.0f} s; see {self.log_file}"
        )

    def unregister_model(self, model_name: str, timeout: float = 60.0) -> None:
        self._management("DELETE", f"/models/{urllib.parse.quote(model_name)}", timeout=timeout)

    def _management(self, method: str, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(
            self.management_url + path,
            method=method,
            headers={"Authorization": f"Bearer {self.keys().management}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace")[:500]
            raise DependencyUnavailable(
                f"TorchServe management {method} {path} answered {error.code}: {detail}"
            ) from error
        except (urllib.error.URLError, OSError) as error:
            raise DependencyUnavailable(f"TorchServe management API unreachable: {error}") from error


def _token_expiration_min(config_file: Path) -> float:
    """``token_expiration_min`` of a config.properties (TorchServe's default: 60)."""
    for line in config_file.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "token_expiration_min" and not line.lstrip().startswith("#"):
            try:
                return max(float(value), 1.0)
            except ValueError:
                break
    return 60.0
