"""Settings of histoxplain, read from the environment once at start-up: one mechanism for all.

:class:`Settings` holds what every entry point needs (CLI, gateway, evaluation);
:class:`GatewaySettings` holds it plus what only the gateway reads (``docs/SERVING.md`` lists
those variables). Both are frozen and built from the same kind of table: one ``_Var`` per
variable, parsed by :func:`_read` and range-checked by :func:`_check`.

Core variables:

One frozen :class:`Settings` object is built by :meth:`Settings.from_env` and passed down; no
module reads ``os.environ`` on its own. Every field has one environment variable:

==================================  ======================  ===============================  =======================================
variable                            field                   default                          allowed
==================================  ======================  ===============================  =======================================
``HISTOXPLAIN_DATA``                ``data_dir``            ``./histoxplain-data``           a folder path (created on use)
``QDRANT_URL``                      ``qdrant_url``          unset: the embedded engine       an ``http://`` or ``https://`` URL
``QDRANT_API_KEY``                  ``qdrant_api_key``      unset                            any string (server mode only)
``HISTOXPLAIN_MAX_PIXELS``          ``max_pixels``          20000 * 20000                    integer >= 1 (width * height)
``HISTOXPLAIN_MAX_REQUEST_PIXELS``  ``max_request_pixels``  4096 * 4096                      integer >= 1 (width * height)
``HISTOXPLAIN_MODEL``               ``model``               ``efficientnet-lite0-imagenet``  an encoder preset name
``HISTOXPLAIN_WEIGHTS``             ``weights``             unset: the preset's own          path to a local state-dict file
``HISTOXPLAIN_TILE_SIZE``           ``tile_size``           224                              integer 16..8192 (pixels)
``HISTOXPLAIN_STRIDE``              ``stride``              unset: the tile size             integer 1..8192 (pixels)
``HISTOXPLAIN_MIN_TISSUE``          ``min_tissue``          0.25                             number 0..1 (0 keeps every tile)
``HISTOXPLAIN_SLIDE_LEVEL``         ``slide_level``         0                                integer >= 0 (pyramid level)
``HISTOXPLAIN_BATCH_SIZE``          ``batch_size``          64                               integer 1..4096 (tiles per upsert)
``HISTOXPLAIN_DEVICE``              ``device``              ``auto``: GPU 0, else the CPU    ``cpu``, ``cuda``, ``cuda:N``, ``auto``
``HISTOXPLAIN_INDEX_ENGINE``        ``index_engine``        ``edge``                         ``edge`` (qdrant-edge) or ``local``
``HISTOXPLAIN_HNSW_M``              ``hnsw_m``              16                               integer 4..128 (graph edges per node)
``HISTOXPLAIN_HNSW_EF_CONSTRUCT``   ``hnsw_ef_construct``   100                              integer 4..4096
``HISTOXPLAIN_HNSW_EF``             ``hnsw_ef``             128                              integer 1..4096 (search candidates)
``HISTOXPLAIN_EXACT_SEARCH``        ``exact_search``        0                                1 or 0 (1: brute force, no HNSW)
``HISTOXPLAIN_QUANTIZATION``        ``quantization``        ``none``                         ``none`` or ``int8`` (scalar)
``HISTOXPLAIN_RESCORE``             ``rescore``             1                                1 or 0 (re-rank with float vectors)
``HISTOXPLAIN_OVERSAMPLING``        ``oversampling``        2.0                              number 1..16 (candidates rescored)
``HISTOXPLAIN_VECTORS_ON_DISK``     ``vectors_on_disk``     0                                1 or 0 (float vectors memory-mapped)
``HISTOXPLAIN_PAYLOAD_ON_DISK``     ``payload_on_disk``     1                                1 or 0
``HISTOXPLAIN_TILE_PIXELS``         ``tile_pixels``         ``local``                        ``local`` (data folder) or ``payload``
``..._SHARD_NUMBER``                ``shard_number``        1                                integer 1..1024 (server collections)
``..._REPLICATION_FACTOR``          ``replication_factor``  1                                integer 1..16 (copies of each shard)
``..._WRITE_CONSISTENCY_FACTOR``    ``write_consistency_factor`` 1                           integer 1..replication_factor
``HISTOXPLAIN_DICOMWEB_URL``        ``dicomweb_url``        unset: no PACS                   an ``http://`` or ``https://`` URL
``HISTOXPLAIN_DICOMWEB_USER``       ``dicomweb_user``       unset: no authentication         a user name (HTTP Basic)
``HISTOXPLAIN_DICOMWEB_PASSWORD``   ``dicomweb_password``   unset                            any string (prefer the file below)
``..._DICOMWEB_PASSWORD_FILE``      ``dicomweb_password_file`` unset                         a path to a file holding the password
``..._DICOMWEB_TOKEN_FILE``         ``dicomweb_token_file`` unset                            a path to a file holding an OAuth 2.0 access token
``HISTOXPLAIN_DICOMWEB_TIMEOUT_S``  ``dicomweb_timeout_s``  30                               seconds > 0 (one HTTP request)
``..._DICOM_CROSS_PATIENT``         ``dicom_cross_patient`` 1                                1 or 0 (results may reference others)
==================================  ======================  ===============================  =======================================

The ``DICOMWEB`` settings name the PACS that DICOM slides are read from and results are stored
into (``docs/PACS.md``); ``..._PASSWORD_FILE`` is ``HISTOXPLAIN_DICOMWEB_PASSWORD_FILE`` (a
mounted secret, read when a connection opens) and ``..._DICOM_CROSS_PATIENT`` is
``HISTOXPLAIN_DICOM_CROSS_PATIENT``: 0 keeps the DICOM objects written into a study from
referencing slides of other patients.

``index_engine`` picks the embedded store when ``QDRANT_URL`` is unset: Qdrant's own engine
in-process (qdrant-edge, under ``<data_dir>/edge``) or qdrant-client's local mode (under
``<data_dir>/qdrant``, the store of earlier versions; ``histoxplain migrate`` moves its indexes).
The HNSW, quantization and on-disk settings shape an index when it is created (an existing index
keeps its own); ``hnsw_ef``, ``exact_search``, ``rescore`` and ``oversampling`` apply per search.
They apply to collections the gateway creates on a Qdrant server too, with the cluster settings
``HISTOXPLAIN_SHARD_NUMBER``, ``HISTOXPLAIN_REPLICATION_FACTOR`` and
``HISTOXPLAIN_WRITE_CONSISTENCY_FACTOR`` (Qdrant's ``shard_number``, ``replication_factor``,
``write_consistency_factor``; a single server keeps 1, 1, 1). ``tile_pixels`` says where the
pixels of indexed tiles are kept: ``local`` under ``<data_dir>/tiles`` (one machine), ``payload``
as a PNG in each point's payload, so every gateway replica in front of one Qdrant reads them
(``docs/SERVING.md``, "From one machine to a cluster"; not available on the edge engine).

``device`` is where the in-process (embedded) encoder runs; its spelling is checked here,
whether that GPU exists when the encoder is loaded. An empty value counts as unset. A bad value raises
:class:`~histoxplain_model.errors.InvalidRequest` naming the variable and what it allows.
To add a setting: add a field (with its default) and one ``_Var`` line to ``_VARIABLES``;
``from_env`` and the checks pick it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from histoxplain_model.devices import check_device_name
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.imageio import DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS
from histoxplain_model.limits import MAX_K, MAX_MESSAGE_BYTES, MAX_TILE_SIZE, MIN_TILE_SIZE
from histoxplain_model.vocabulary import DEFAULT_PRESET

__all__ = [
    "BACKENDS", "INDEX_ENGINES", "QUANTIZATIONS", "TILE_PIXELS", "BackendKind", "GatewaySettings", "IndexEngineKind",
    "QuantizationKind", "Settings", "TilePixelsKind",
]


@dataclass(frozen=True)
class _Var:
    """How one environment variable becomes one field: parse the text, then check the value."""

    field: str
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


def _int(text: str) -> int:
    return int(text.replace("_", ""), 10)


def _url(text: str) -> str | None:
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise ValueError(text)
    return text.rstrip("/")


def _device_name(value: object) -> bool:
    try:
        check_device_name(str(value))
    except InvalidRequest:
        return False
    return True


_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _flag(text: str) -> bool:
    """An on/off switch; anything but the spellings in ``_FLAGS`` is refused, not read as off."""
    if text.lower() not in _FLAGS:
        raise ValueError(text)
    return _FLAGS[text.lower()]


IndexEngineKind = Literal["edge", "local"]
INDEX_ENGINES: tuple[IndexEngineKind, ...] = ("edge", "local")
QuantizationKind = Literal["none", "int8"]
QUANTIZATIONS: tuple[QuantizationKind, ...] = ("none", "int8")
TilePixelsKind = Literal["local", "payload"]
TILE_PIXELS: tuple[TilePixelsKind, ...] = ("local", "payload")


_VARIABLES: tuple[_Var, ...] = (
    _Var("data_dir", "HISTOXPLAIN_DATA", lambda t: Path(t).expanduser(), lambda v: str(v) != "", "a folder path"),
    _Var("qdrant_url", "QDRANT_URL", _url, None, "an http:// or https:// URL of a Qdrant server, or unset"),
    _Var("qdrant_api_key", "QDRANT_API_KEY", _optional_str),
    _Var("max_pixels", "HISTOXPLAIN_MAX_PIXELS", _int, lambda v: v >= 1, "an integer >= 1 (width * height)"),
    _Var("max_request_pixels", "HISTOXPLAIN_MAX_REQUEST_PIXELS", _int, lambda v: v >= 1,
         "an integer >= 1 (width * height)"),
    _Var("model", "HISTOXPLAIN_MODEL", str.strip, lambda v: v != "", "an encoder preset name"),
    _Var("weights", "HISTOXPLAIN_WEIGHTS", _optional_path, None, "a path to a weights file, or unset"),
    _Var("tile_size", "HISTOXPLAIN_TILE_SIZE", _int, lambda v: MIN_TILE_SIZE <= v <= MAX_TILE_SIZE,
         f"an integer from {MIN_TILE_SIZE} to {MAX_TILE_SIZE}"),
    _Var("stride", "HISTOXPLAIN_STRIDE", lambda t: _int(t) if t else None,
         lambda v: v is None or 1 <= v <= 8192, "an integer from 1 to 8192, or unset (= tile size)"),
    _Var("min_tissue", "HISTOXPLAIN_MIN_TISSUE", float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1"),
    _Var("slide_level", "HISTOXPLAIN_SLIDE_LEVEL", _int, lambda v: v >= 0, "an integer >= 0"),
    _Var("batch_size", "HISTOXPLAIN_BATCH_SIZE", _int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    _Var("device", "HISTOXPLAIN_DEVICE", str.lower, _device_name,
         "cpu, cuda, cuda:N (N = GPU index) or auto (cuda:0 when there is a GPU, else cpu)"),
    _Var("index_engine", "HISTOXPLAIN_INDEX_ENGINE", str.lower, lambda v: v in INDEX_ENGINES,
         f"one of {', '.join(INDEX_ENGINES)}"),
    _Var("hnsw_m", "HISTOXPLAIN_HNSW_M", _int, lambda v: 4 <= v <= 128, "an integer from 4 to 128"),
    _Var("hnsw_ef_construct", "HISTOXPLAIN_HNSW_EF_CONSTRUCT", _int, lambda v: 4 <= v <= 4096,
         "an integer from 4 to 4096"),
    _Var("hnsw_ef", "HISTOXPLAIN_HNSW_EF", _int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    _Var("exact_search", "HISTOXPLAIN_EXACT_SEARCH", _flag, None, "1 or 0"),
    _Var("quantization", "HISTOXPLAIN_QUANTIZATION", str.lower, lambda v: v in QUANTIZATIONS,
         f"one of {', '.join(QUANTIZATIONS)}"),
    _Var("rescore", "HISTOXPLAIN_RESCORE", _flag, None, "1 or 0"),
    _Var("oversampling", "HISTOXPLAIN_OVERSAMPLING", float, lambda v: 1.0 <= v <= 16.0, "a number from 1 to 16"),
    _Var("vectors_on_disk", "HISTOXPLAIN_VECTORS_ON_DISK", _flag, None, "1 or 0"),
    _Var("payload_on_disk", "HISTOXPLAIN_PAYLOAD_ON_DISK", _flag, None, "1 or 0"),
    _Var("tile_pixels", "HISTOXPLAIN_TILE_PIXELS", str.lower, lambda v: v in TILE_PIXELS,
         f"one of {', '.join(TILE_PIXELS)}"),
    _Var("shard_number", "HISTOXPLAIN_SHARD_NUMBER", _int, lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
    _Var("replication_factor", "HISTOXPLAIN_REPLICATION_FACTOR", _int, lambda v: 1 <= v <= 16,
         "an integer from 1 to 16"),
    _Var("write_consistency_factor", "HISTOXPLAIN_WRITE_CONSISTENCY_FACTOR", _int, lambda v: 1 <= v <= 16,
         "an integer from 1 to 16, at most HISTOXPLAIN_REPLICATION_FACTOR"),
    _Var("dicomweb_url", "HISTOXPLAIN_DICOMWEB_URL", _url, None,
         "the http:// or https:// URL of a DICOMweb service (e.g. http://127.0.0.1:8042/dicom-web), or unset"),
    _Var("dicomweb_user", "HISTOXPLAIN_DICOMWEB_USER", _optional_str),
    _Var("dicomweb_password", "HISTOXPLAIN_DICOMWEB_PASSWORD", _optional_str),
    _Var("dicomweb_password_file", "HISTOXPLAIN_DICOMWEB_PASSWORD_FILE", _optional_path, None, "a path, or unset"),
    _Var("dicomweb_token_file", "HISTOXPLAIN_DICOMWEB_TOKEN_FILE", _optional_path, None, "a path, or unset"),
    _Var("dicomweb_timeout_s", "HISTOXPLAIN_DICOMWEB_TIMEOUT_S", float, lambda v: v > 0, "seconds > 0"),
    _Var("dicom_cross_patient", "HISTOXPLAIN_DICOM_CROSS_PATIENT", _flag, None, "1 or 0"),
)


@dataclass(frozen=True)
class Settings:
    """Validated core settings (see the module docstring for the variables and defaults).

    Attributes:
        data_dir: where local-mode Qdrant (``<data_dir>/qdrant``) and tile PNGs
            (``<data_dir>/tiles/<index>/``) live.
        qdrant_url: a Qdrant server; ``None`` uses embedded local mode under ``data_dir``.
        qdrant_api_key: API key sent to the Qdrant server.
        max_pixels: largest plain image (width * height) decoded, a decompression-bomb guard.
        max_request_pixels: largest image sent as bytes (gateway requests, TorchServe worker);
            such images are held to the smaller of the two limits (``histoxplain_model.imageio``
            says why 16 Mpx).
        model: encoder preset name.
        weights: local weights file for presets that need one.
        tile_size: tile edge in pixels at the read level.
        stride: step between tiles in pixels; ``None`` means ``tile_size`` (no overlap).
        min_tissue: fraction of a tile that must be tissue for it to be indexed.
        slide_level: pyramid level read from whole-slide files.
        batch_size: tiles embedded and upserted per batch.
        device: torch device of the in-process encoder: ``cpu``, ``cuda``, ``cuda:N`` or
            ``auto`` (``histoxplain_model.devices.resolve_device``).
        index_engine: the embedded store when ``qdrant_url`` is unset: ``edge`` (Qdrant's engine
            in-process, under ``<data_dir>/edge``) or ``local`` (qdrant-client local mode).
        hnsw_m: HNSW edges per node of a new index (more: better recall, more memory).
        hnsw_ef_construct: HNSW build candidates of a new index (more: better graph, slower build).
        hnsw_ef: HNSW search candidates per query (more: better recall, slower search).
        exact_search: always search by brute force (exact scores and order, no HNSW).
        quantization: ``int8``: new indexes keep a scalar-quantized copy of the vectors in RAM
            for the graph search (4x smaller); ``none``: float vectors only.
        rescore: with quantization, re-rank the candidates with the float vectors (scores exact).
        oversampling: with quantization, candidates fetched per hit before rescoring.
        vectors_on_disk: new indexes keep float vectors memory-mapped instead of in RAM.
        payload_on_disk: new indexes keep tile payloads memory-mapped instead of in RAM.
        tile_pixels: ``local``: tile PNGs under ``<data_dir>/tiles``; ``payload``: a PNG in each
            point's payload (every gateway in front of one Qdrant server or cluster reads it).
        shard_number: shards of a collection created on a Qdrant server (cluster: spread over nodes).
        replication_factor: copies of each shard on a Qdrant cluster (2: one node may fail).
        write_consistency_factor: replicas that must acknowledge a write before it succeeds.
        dicomweb_url: the DICOMweb service (QIDO-RS, WADO-RS, STOW-RS root) of the PACS that DICOM
            slides are read from and results are stored into; ``None``: no PACS.
        dicomweb_user: HTTP Basic user for the PACS; ``None``: no authentication.
        dicomweb_password: that user's password (a secret: kept out of logs and ``repr``).
        dicomweb_password_file: a file holding the password (e.g. a mounted Kubernetes Secret),
            read each time a connection opens; give either this or ``dicomweb_password``.
        dicomweb_token_file: a file holding an OAuth 2.0 access token sent as ``Authorization:
            Bearer`` (PACS behind an identity provider: cloud DICOMweb services, a hospital's
            gateway), re-read whenever the file changes so a refresher can rotate it; instead of
            the user and password.
        dicomweb_timeout_s: the timeout of one HTTP request to the PACS.
        dicom_cross_patient: the DICOM objects written into a study may reference similar slides
            of other patients (by UID only, never their demographics); off: they reference only
            the same patient's slides (``docs/PACS.md`` says why one would turn it off).
    """

    data_dir: Path = Path("./histoxplain-data")
    qdrant_url: str | None = None
    qdrant_api_key: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    model: str = DEFAULT_PRESET
    weights: Path | None = None
    tile_size: int = 224
    stride: int | None = None
    min_tissue: float = 0.25
    slide_level: int = 0
    batch_size: int = 64
    device: str = "auto"
    index_engine: IndexEngineKind = "edge"
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    hnsw_ef: int = 128
    exact_search: bool = False
    quantization: QuantizationKind = "none"
    rescore: bool = True
    oversampling: float = 2.0
    vectors_on_disk: bool = False
    payload_on_disk: bool = True
    tile_pixels: TilePixelsKind = "local"
    shard_number: int = 1
    replication_factor: int = 1
    write_consistency_factor: int = 1
    dicomweb_url: str | None = None
    dicomweb_user: str | None = None
    dicomweb_password: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    dicomweb_password_file: Path | None = None
    dicomweb_token_file: Path | None = None
    dicomweb_timeout_s: float = 30.0
    dicom_cross_patient: bool = True

    def __post_init__(self) -> None:
        # Accept str paths from callers (tests, flags); the fields are always Path afterwards.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        _check(self, _VARIABLES)
        if self.write_consistency_factor > self.replication_factor:
            raise InvalidRequest(
                f"HISTOXPLAIN_WRITE_CONSISTENCY_FACTOR={self.write_consistency_factor} is above "
                f"HISTOXPLAIN_REPLICATION_FACTOR={self.replication_factor}; a write cannot wait for more copies than exist"
            )

    @property
    def tile_stride(self) -> int:
        """The effective stride: ``stride`` or, when unset, ``tile_size``."""
        return self.stride if self.stride is not None else self.tile_size

    @property
    def qdrant_path(self) -> Path:
        """Folder of the embedded (local-mode) Qdrant storage."""
        return self.data_dir / "qdrant"

    @property
    def edge_path(self) -> Path:
        """Folder of the embedded qdrant-edge indexes (one folder per index)."""
        return self.data_dir / "edge"

    def tiles_dir(self, index_name: str) -> Path:
        """Folder of the tile PNGs of one index."""
        return self.data_dir / "tiles" / index_name

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (e.g. from command-line flags), validated again."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read every variable in the table above; unset or empty ones keep their defaults.

        Raises:
            InvalidRequest: a value that does not parse or is out of range; the message names
                the variable and what it allows.
        """
        return cls(**_read(environ, _VARIABLES))


def _read(environ: Mapping[str, str], variables: tuple[_Var, ...]) -> dict[str, Any]:
    """The set, non-empty variables of ``variables``, parsed (range checks come after)."""
    values: dict[str, Any] = {}
    for var in variables:
        text = (environ.get(var.env) or "").strip()
        if text == "":
            continue
        try:
            values[var.field] = var.parse(text)
        except ValueError:
            raise InvalidRequest(
                f"{var.env}={text!r} is not allowed; use {var.allowed or 'a valid value'}"
            ) from None
    return values


def _check(instance: object, variables: tuple[_Var, ...]) -> None:
    for var in variables:
        value = getattr(instance, var.field)
        if var.check is not None and not var.check(value):
            raise InvalidRequest(f"{var.env} ({var.field}) = {value!r} is not allowed; use {var.allowed}")



BackendKind = Literal["torchserve", "embedded"]
BACKENDS: tuple[BackendKind, ...] = ("torchserve", "embedded")
_MIB = 1024 * 1024


def _positive(value: float) -> bool:
    return value > 0


_GATEWAY_VARIABLES: tuple[_Var, ...] = (
    _Var("host", "HISTOXPLAIN_HOST", str, lambda v: v != "", "a host name or address"),
    _Var("port", "HISTOXPLAIN_PORT", _int, lambda v: 0 <= v <= 65535, "a port number (0-65535)"),
    _Var("backend", "HISTOXPLAIN_BACKEND", str.lower, lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    _Var("torchserve_address", "HISTOXPLAIN_TORCHSERVE_ADDRESS", str, lambda v: v != "", "host:port"),
    _Var("torchserve_key_file", "HISTOXPLAIN_TORCHSERVE_KEY_FILE", _optional_path, None, "a path"),
    _Var("torchserve_model", "HISTOXPLAIN_TORCHSERVE_MODEL", str, lambda v: v != "", "a model name"),
    _Var("max_message_bytes", "HISTOXPLAIN_MAX_MESSAGE_MB", lambda t: int(float(t) * _MIB), _positive,
         "a number of MiB > 0"),
    _Var("default_deadline_s", "HISTOXPLAIN_DEFAULT_DEADLINE_S", float, _positive, "seconds > 0"),
    _Var("max_deadline_s", "HISTOXPLAIN_MAX_DEADLINE_S", float, _positive, "seconds > 0"),
    _Var("max_k", "HISTOXPLAIN_MAX_K", _int, lambda v: 1 <= v <= MAX_K, f"an integer from 1 to {MAX_K}"),
    _Var("max_explain_k", "HISTOXPLAIN_MAX_EXPLAIN_K", _int, lambda v: 1 <= v <= MAX_K,
         f"an integer from 1 to {MAX_K}"),
    _Var("max_explain_cost", "HISTOXPLAIN_MAX_EXPLAIN_COST", _int, _positive, "an integer > 0 (work units)"),
    _Var("worker_threads", "HISTOXPLAIN_WORKER_THREADS", _int, _positive, "an integer > 0"),
    _Var("index_buffer_images", "HISTOXPLAIN_INDEX_BUFFER_IMAGES", _int, _positive, "an integer > 0"),
    _Var("index_buffer_bytes", "HISTOXPLAIN_INDEX_BUFFER_MB", lambda t: int(float(t) * _MIB), _positive,
         "a number of MiB > 0"),
    _Var("grace_period_s", "HISTOXPLAIN_GRACE_PERIOD_S", float, lambda v: v >= 0, "seconds >= 0"),
    _Var("health_interval_s", "HISTOXPLAIN_HEALTH_INTERVAL_S", float, _positive, "seconds > 0"),
    _Var("health_port", "HISTOXPLAIN_HEALTH_PORT", lambda t: _int(t) if t else None,
         lambda v: v is None or 0 <= v <= 65535, "a port number (0-65535), or unset for none"),
    _Var("tls_cert", "HISTOXPLAIN_TLS_CERT", _optional_path, None, "a path to a PEM certificate chain"),
    _Var("tls_key", "HISTOXPLAIN_TLS_KEY", _optional_path, None, "a path to a PEM private key"),
    _Var("tls_client_ca", "HISTOXPLAIN_TLS_CLIENT_CA", _optional_path, None, "a path to a PEM CA bundle"),
    _Var("auth_tokens_file", "HISTOXPLAIN_AUTH_TOKENS_FILE", _optional_path, None, "a path to a token-hash file"),
    _Var("jwt_jwks", "HISTOXPLAIN_JWT_JWKS", _optional_str, None, "a path to a JWKS file, or an https:// URL"),
    _Var("jwt_issuer", "HISTOXPLAIN_JWT_ISSUER", _optional_str, None, "the issuer (iss) of accepted tokens"),
    _Var("jwt_audience", "HISTOXPLAIN_JWT_AUDIENCE", _optional_str, None, "the audience (aud) of accepted tokens"),
    _Var("jwt_roles_claim", "HISTOXPLAIN_JWT_ROLES_CLAIM", str.strip, lambda v: v != "",
         "a dotted claim path, e.g. realm_access.roles"),
    _Var("jwt_leeway_s", "HISTOXPLAIN_JWT_LEEWAY_S", float, lambda v: 0 <= v <= 300, "seconds from 0 to 300"),
    _Var("reflection", "HISTOXPLAIN_REFLECTION", _flag, None, "1 or 0 (unset: on only on loopback)"),
    _Var("allow_insecure_remote", "HISTOXPLAIN_ALLOW_INSECURE_REMOTE", _flag, None, "1 or 0"),
)


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway reads from the environment, validated.

    Attributes:
        core: the settings shared with the CLI (data dir, Qdrant URL, max pixels, preset...).
        host: address the gateway binds (``HISTOXPLAIN_HOST``); loopback unless told otherwise.
        port: port the gateway binds (``HISTOXPLAIN_PORT``); 0 picks a free one (tests).
        backend: ``torchserve`` (TorchServe's gRPC inference API) or ``embedded`` (in-process).
        torchserve_address: ``host:port`` of TorchServe's gRPC inference API.
        torchserve_key_file: TorchServe's ``key_file.json`` (token authorization), if any.
        torchserve_model: the model name registered in TorchServe.
        max_message_bytes: largest request or response message, both directions.
        default_deadline_s: deadline of a call that arrives without one.
        max_deadline_s: upper bound on any call's deadline, whatever the client asks for.
        max_k: largest ``k`` a Search may ask for, at most ``histoxplain_model.limits.MAX_K``
            (the limit every layer checks).
        max_explain_k: largest number of references one Explain / SearchAndExplain explains
            (the API allows up to 100 for SearchAndExplain; each costs a backward pass).
        max_explain_cost: explanation work in flight at once, in units of about one forward
            pass (``gateway/admission.py``); beyond it calls get RESOURCE_EXHAUSTED at once.
        worker_threads: threads that run model and index calls off the event loop.
        index_buffer_images: images of one IndexImages stream that may wait in memory for the
            indexing thread; beyond it the gateway stops reading (flow control holds the client).
        index_buffer_bytes: bytes that may wait likewise (one image is always admitted, so the
            bound per stream is this, or one message, plus the image being indexed).
        grace_period_s: how long SIGTERM lets in-flight calls finish before cancelling them.
        health_interval_s: how often health re-checks the model backend and Qdrant.
        health_port: a second, plaintext port that serves only ``grpc.health.v1`` (kubelet
            gRPC probes cannot speak TLS); ``None``: no such port.
        tls_cert: PEM certificate chain of the gateway; with ``tls_key`` it turns TLS on. Both
            files are re-read when they change (rotation without a restart).
        tls_key: PEM private key (unencrypted) matching ``tls_cert``.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed
            (mutual TLS).
        auth_tokens_file: static API tokens, one ``<sha256 hex> <role> <principal>`` per line;
            with ``jwt_jwks`` either one turns authentication on.
        jwt_jwks: the JWKS (a file path, or an ``https://`` URL) that signs accepted bearer JWTs.
        jwt_issuer: the ``iss`` every accepted JWT carries (required with ``jwt_jwks``).
        jwt_audience: the ``aud`` every accepted JWT carries (required with ``jwt_jwks``).
        jwt_roles_claim: dotted path of the claim holding a JWT's roles (Keycloak:
            ``realm_access.roles``).
        jwt_leeway_s: clock skew tolerated on ``exp`` / ``nbf``.
        reflection: serve gRPC reflection; ``None``: only when bound to loopback.
        allow_insecure_remote: start on a non-loopback address without TLS or authentication
            (refused otherwise); logged as a warning.
    """

    core: Settings
    host: str = "127.0.0.1"
    port: int = 50051
    backend: BackendKind = "torchserve"
    torchserve_address: str = "127.0.0.1:7070"
    torchserve_key_file: Path | None = None
    torchserve_model: str = "histoxplain"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    default_deadline_s: float = 60.0
    max_deadline_s: float = 300.0
    max_k: int = 100
    max_explain_k: int = 100
    max_explain_cost: int = 2000
    worker_threads: int = 4
    index_buffer_images: int = 4
    index_buffer_bytes: int = 64 * _MIB
    grace_period_s: float = 10.0
    health_interval_s: float = 5.0
    health_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None
    jwt_jwks: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_roles_claim: str = "realm_access.roles"
    jwt_leeway_s: float = 30.0
    reflection: bool | None = None
    allow_insecure_remote: bool = False

    def __post_init__(self) -> None:
        _check(self, _GATEWAY_VARIABLES)
        if self.default_deadline_s > self.max_deadline_s:
            raise InvalidRequest(
                f"HISTOXPLAIN_DEFAULT_DEADLINE_S={self.default_deadline_s} is above "
                f"HISTOXPLAIN_MAX_DEADLINE_S={self.max_deadline_s}; lower it or raise the maximum"
            )

    @property
    def address(self) -> str:
        """``host:port`` the server binds (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def deadline_for(self, time_remaining: float | None) -> float:
        """The deadline (seconds) one call gets: the client's remaining time, capped.

        Args:
            time_remaining: ``context.time_remaining()``; ``None`` when the client set none.
        """
        if time_remaining is None:
            return self.default_deadline_s
        return max(0.0, min(time_remaining, self.max_deadline_s))

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, core: Settings | None = None
    ) -> GatewaySettings:
        """Read ``HISTOXPLAIN_*`` gateway variables (and the core settings) once.

        Args:
            environ: the environment to read; ``os.environ`` when omitted.
            core: core settings already read; ``Settings.from_env()`` when omitted.
        """
        env = os.environ if environ is None else environ
        return cls(core=core if core is not None else Settings.from_env(), **_read(env, _GATEWAY_VARIABLES))
