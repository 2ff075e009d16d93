"""A real PACS for tests and for users: Orthanc (Debian) with its DICOMweb and whole-slide plugins.

    python -m histoxplain_service.pacs.orthanc --storage DIR [--http-port 8042] [--dicom-port 4242]

starts Orthanc on this machine with its storage in ``DIR``, HTTP authentication on (user
``histoxplain``, a generated password written to ``DIR/credentials/password``, mode 0600) and
prints the settings that point histoxplain at it; Ctrl-C or SIGTERM stops it. With
``--trigger-gateway HOST:PORT [--trigger-index NAME]`` it also loads :mod:`.orthanc_trigger`, which
indexes every study that becomes stable through that gateway. Orthanc is
``apt-get install orthanc orthanc-dicomweb orthanc-wsi orthanc-python`` (``.ci/apt-packages.txt``).

Security
    Orthanc 1.10 has no bind-address option: it listens on every address. So the configuration
    keeps ``RemoteAccessAllowed: false`` (HTTP from other machines is refused), turns
    authentication on, and lets no DICOM peer store, echo or query (no modality is declared and
    ``DicomAlways*`` are off). The tests go further: with ``private_network`` Orthanc runs in a
    network namespace of its own that has only loopback (``unshare -n``, needs root), and the
    test thread joins it (:meth:`OrthancProcess.network`), so nothing outside the test can reach it.

Life cycle
    :class:`OrthancProcess` starts Orthanc as a child process that the kernel stops when its
    parent dies (``PR_SET_PDEATHSIG``), waits until its REST API answers with the credentials, and
    stops it by process id (SIGTERM, SIGKILL after a grace period), waiting for it to exit: a new
    Orthanc on the same storage before the old one has exited finds its SQLite index locked.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from histoxplain_model.errors import DependencyUnavailable
from histoxplain_service.pacs.orthanc_trigger import TriggerOptions

__all__ = ["OrthancConfig", "OrthancProcess", "PLUGIN_DIR", "TRIGGER_SCRIPT", "main", "private_network_available"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DEFAULT_PLUGINS = ("libOrthancDicomWeb.so", "libOrthancWSI.so")
PYTHON_PLUGIN = "libOrthancPython.so"
#: The Orthanc Python-plugin script that indexes stable studies (:mod:`.orthanc_trigger`).
TRIGGER_SCRIPT = Path(__file__).with_name("orthanc_trigger.py")
#: The number of the trigger's user metadata entry (Orthanc's user range is 1024-65535).
TRIGGER_METADATA_NUMBER = 4501
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class OrthancConfig:
    """What the Orthanc configuration file says (see the module docstring for the choices).

    Attributes:
        storage: folder of Orthanc's files and SQLite index (created).
        http_port, dicom_port: its REST/DICOMweb and DICOM ports (default: free ones).
        user, password: the one HTTP user (default password: 32 random URL-safe characters).
        aet: Orthanc's DICOM application entity title.
        stable_age_s: seconds without a new instance after which a study counts as stable.
        plugins: plugin file names in ``PLUGIN_DIR``, or absolute paths.
        trigger: index stable studies through the gateway (adds the Python plugin, the
            :data:`TRIGGER_SCRIPT`, its metadata entry and its options; empty
            ``site_packages``: this interpreter's, which must be the system python3's version,
            3.11 on Debian 12, as the tests' virtual environment is); ``None``: no trigger.
        extra: more configuration keys.
    """

    storage: Path
    http_port: int = field(default_factory=_free_port)
    dicom_port: int = field(default_factory=_free_port)
    user: str = "histoxplain"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    aet: str = "HISTOXPLAIN"
    stable_age_s: int = 5
    plugins: Sequence[str] = DEFAULT_PLUGINS
    trigger: TriggerOptions | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        storage = str(Path(self.storage).resolve())
        config: dict[str, Any] = {
            "Name": "histoxplain",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomModalities": {},
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "StableAge": self.stable_age_s,
            "Plugins": [str(Path(p) if Path(p).is_absolute() else PLUGIN_DIR / p) for p in self.plugins],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Host": f"{LOOPBACK}:{self.http_port}",
                "Ssl": False,
            },
            # Frames are JPEG already; gzip on loopback costs time and saves nothing.
            "HttpCompressionEnabled": False,
            "OverwriteInstances": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
        }
        if self.trigger is not None:
            config["Plugins"].append(str(PLUGIN_DIR / PYTHON_PLUGIN))
            config["PythonScript"] = str(TRIGGER_SCRIPT)
            config["UserMetadata"] = {self.trigger.metadata: TRIGGER_METADATA_NUMBER}
            config["Histoxplain"] = self.trigger.as_section()
            if not self.trigger.site_packages:
                config["Histoxplain"]["SitePackages"] = [sysconfig.get_paths()["purelib"]]
        config.update(self.extra)
        return config

    @property
    def url(self) -> str:
        """Orthanc's REST API (loopback)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"


def private_network_available() -> bool:
    """Whether Orthanc can run in a private network namespace here (root, ``unshare`` and ``ip``)."""
    if shutil.which("unshare") is None or _ip() is None:
        return False
    try:
        result = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _ip() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)


def _orthanc_executable() -> str:
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None
    )
    if found is None:
        raise DependencyUnavailable(
            "Orthanc is not installed; apt-get install orthanc orthanc-dicomweb orthanc-wsi (.ci/apt-packages.txt)"
        )
    return found


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns(CLONE_NEWNET) failed: {os.strerror(error)}")


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM when the parent thread dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class OrthancProcess:
    """One Orthanc started and stopped by this process.

    Args:
        work_dir: this instance's folder: ``orthanc.json`` (mode 0600: it holds the password),
            ``orthanc.log``, and the storage unless ``config`` names another.
        config: the configuration (default: storage in ``work_dir/storage``, free ports).
        private_network: run Orthanc in a network namespace of its own with only loopback
            (root only); callers reach it from threads inside :meth:`network`.
        stop_grace_s: how long Orthanc may take to stop on SIGTERM before it is killed.

    Start it from a thread that outlives it (the main thread): the kernel stops Orthanc when the
    thread that started it ends.
    """

    def __init__(
        self, work_dir: Path, config: OrthancConfig | None = None, private_network: bool = False,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.config = config or OrthancConfig(storage=self.work_dir / "storage")
        self.private_network = private_network
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._netns_lock = threading.Lock()

    @property
    def config_file(self) -> Path:
        return self.work_dir / "orthanc.json"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "orthanc.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def dicomweb_url(self) -> str:
        return self.config.dicomweb_url

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers with the credentials.

        Raises:
            DependencyUnavailable: Orthanc is not installed, exits, or does not answer in time.
        """
        if self.running:
            raise RuntimeError("this Orthanc is already running")
        executable = _orthanc_executable()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        Path(self.config.storage).mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(self.config.as_json(), handle, indent=2)
        command = [executable, str(self.config_file)]
        if self.private_network:
            # A new network namespace starts with loopback down; bring it up, then become Orthanc.
            command = ["unshare", "-n", "sh", "-c", f'{_ip()} link set lo up && exec "$0" "$@"', *command]
        log.info("starting Orthanc (HTTP port %d, log %s)", self.config.http_port, self.log_file)
        with self.log_file.open("ab") as output:
            self._process = subprocess.Popen(
                command, cwd=self.work_dir, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 -- only a prctl before exec
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        token = b64encode(f"{self.config.user}:{self.config.password}".encode()).decode()
        request = urllib.request.Request(f"{self.url}/system", headers={"Authorization": f"Basic {token}"})
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise DependencyUnavailable(f"Orthanc exited during start-up; see {self.log_file}")
            try:
                with self.network(), urllib.request.urlopen(request, timeout=2.0):
                    return
            except (urllib.error.URLError, OSError) as error:
                last = type(error).__name__
            time.sleep(0.05)
        raise DependencyUnavailable(f"Orthanc did not answer within {timeout:.0f} s ({last}); see {self.log_file}")

    def stop(self) -> None:
        """Stop the Orthanc this object started (SIGTERM, SIGKILL after the grace period) and
        wait until it has exited."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("Orthanc did not stop within %.0f s; killing it", self.stop_grace_s)
            process.kill()
            process.wait()

    def __enter__(self) -> OrthancProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """Run the block in Orthanc's network namespace (with ``private_network``; else a no-op).

        Only the calling thread moves (``setns``); threads it starts inside the block are created
        there too, threads that existed before stay outside. Leaving the block moves it back.
        """
        if not self.private_network or self._process is None:
            yield
            return
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/proc/{self._process.pid}/ns/net", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m histoxplain_service.pacs.orthanc",
        description="Run Orthanc (DICOMweb + whole-slide plugins) on this machine for histoxplain.",
    )
    parser.add_argument("--storage", type=Path, required=True, help="folder of Orthanc's files (created)")
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--stable-age", type=int, default=5, help="seconds after which a study counts as stable")
    parser.add_argument("--trigger-gateway", metavar="HOST:PORT",
                        help="index every new slide through this histoxplain gateway (the orthanc_trigger plugin)")
    parser.add_argument("--trigger-index", metavar="NAME", default="slides", help="the index it writes (default slides)")
    parser.add_argument("--trigger-level", type=int, default=0, help="the pyramid level it indexes (default 0)")
    parser.add_argument("--trigger-token-file", type=Path, help="file holding the gateway's bearer token")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    storage = args.storage.resolve()
    secret = storage / "credentials" / "password"
    secret.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secret.read_text().strip() if secret.exists() else secrets.token_urlsafe(24)
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")
    config = OrthancConfig(
        storage=storage / "db", http_port=args.http_port, dicom_port=args.dicom_port, password=password,
        stable_age_s=args.stable_age,
        trigger=None if args.trigger_gateway is None else TriggerOptions(
            args.trigger_gateway, args.trigger_index, args.trigger_level,
            None if args.trigger_token_file is None else str(args.trigger_token_file.resolve()),
        ),
    )
    orthanc = OrthancProcess(storage / "run", config)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        orthanc.start()
    except DependencyUnavailable as error:
        print(f"histoxplain: error: {error}", file=sys.stderr)
        return error.exit_code
    print(
        f"Orthanc is running (pid {orthanc.pid}); its whole-slide viewer: {orthanc.url}/wsi/app/viewer.html\n"
        f"export HISTOXPLAIN_DICOMWEB_URL={orthanc.dicomweb_url}\n"
        f"export HISTOXPLAIN_DICOMWEB_USER={config.user}\n"
        f"export HISTOXPLAIN_DICOMWEB_PASSWORD_FILE={secret}\n"
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        while not stopping.wait(0.5):
            if not orthanc.running:
                print(f"histoxplain: error: Orthanc exited; see {orthanc.log_file}", file=sys.stderr)
                return 5
    finally:
        orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
