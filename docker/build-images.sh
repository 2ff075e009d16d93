#!/usr/bin/env bash
# Build histoxplain-gateway:<version> and histoxplain-torchserve:<version> with podman, from a
# Debian 12 base made here with debootstrap (no image registry is needed), then check them:
#
#   docker/build-images.sh            build (the base and layers cached between runs), check, print sizes
#   docker/build-images.sh --no-cache build from scratch (debootstrap too), keep no intermediate images (CI)
#   docker/build-images.sh --clean    remove every image this script makes, and dangling ones
#
# <version> is pyproject.toml's. Writes, per image, under build/images/ (HISTOXPLAIN_IMAGES_OUT):
# <name>-<version>.pip-freeze.txt (the venv's distributions), .dpkg.txt (Debian packages) and
# .layers.txt (the layer check's report). The build host's CA bundle (HISTOXPLAIN_BUILD_CA_BUNDLE,
# default /etc/ssl/certs/ca-certificates.crt) reaches pip as a build secret (mounted for the pip
# steps only, never in a layer); docker/check_image_layers.py fails the build if any layer holds
# it, a key, a credential or a package cache. Local wheel indexes named by pip's configuration
# (extra-index-url = file://...) are served on loopback for the build, so the CUDA wheels come
# from disk where the machine has them. Needs: root, podman (runc), debootstrap, python3, ~25 GB free.
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/containers.conf}"
PYTHON="${PYTHON:-python3}"
OUT="${HISTOXPLAIN_IMAGES_OUT:-build/images}"
CA_BUNDLE="${HISTOXPLAIN_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DEBIAN_MIRROR="${HISTOXPLAIN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${HISTOXPLAIN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
DEBIAN_SUITE=bookworm
DEBIAN_BASE=localhost/histoxplain-debian:bookworm-minbase
PYTHON_BASE=localhost/histoxplain-python:3.11-bookworm
VERSION="$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
GATEWAY="localhost/histoxplain-gateway:$VERSION"
TORCHSERVE="localhost/histoxplain-torchserve:$VERSION"

log() { printf '[build-images %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }

clean() {
  local image
  for image in "$GATEWAY" "$TORCHSERVE" "$PYTHON_BASE" "$DEBIAN_BASE"; do
    if podman image exists "$image"; then podman rmi --force "$image" >/dev/null; fi
  done
  podman image prune --force >/dev/null  # dangling images only: unnamed build stages and layers
  log "removed the histoxplain images and dangling images; $(df -h --output=avail "$(podman info --format '{{.Store.GraphRoot}}')" | tail -1 | tr -d ' ') free"
}

CACHE_ARGS=(--layers)
case "${1:-}" in
  "") ;;
  --no-cache) CACHE_ARGS=(--no-cache --layers=false) ;;
  --clean) clean; exit 0 ;;
  *) die "unknown option $1 (--no-cache, --clean)" ;;
esac

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install podman runc debootstrap)"
done
[[ -r "$CA_BUNDLE" ]] || die "no CA bundle at $CA_BUNDLE (set HISTOXPLAIN_BUILD_CA_BUNDLE)"
# Measured peak: about 23 GB above the starting point (the TorchServe venv is 5.9 GB, held by
# the build stage, its copy and the committed layers at once).
STORAGE="$(podman info --format '{{.Store.GraphRoot}}')"
mkdir -p "$STORAGE"
free_gb="$(df --output=avail -BG "$STORAGE" | tail -1 | tr -dc 0-9)"
if ((free_gb < ${HISTOXPLAIN_MIN_FREE_GB:-25})); then
  die "$free_gb GB free under $STORAGE; the build needs about 25 GB (docker/build-images.sh --clean frees what it made)"
fi
mkdir -p "$OUT"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$REVISION" != unknown ]] && [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  REVISION="$REVISION-dirty"
fi
SOURCE="${HISTOXPLAIN_SOURCE_URL:-$(git remote get-url origin 2>/dev/null || echo "histoxplain@$REVISION")}"

# Local wheel indexes from pip's configuration (extra-index-url = file://.../simple, a PEP 503
# folder whose links point next to it), served read-only on loopback for the build (which runs on
# the host network) by a static file server that lives as long as this script: nothing of them is
# mounted, so nothing can stay behind in a layer.
INDEX_SERVERS=()
ROOTFS=""
cleanup() {
  local pid
  for pid in "${INDEX_SERVERS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -n "$ROOTFS" ]]; then rm -rf "$ROOTFS"; fi
}
trap cleanup EXIT
PIP_LOCAL_INDEXES=""
serve_index() {  # serve_index ROOT PORT: serves ROOT on loopback, on PORT if free; sets PORT
  local port
  # A fixed port keeps the pip steps' build cache (build arguments are part of its key).
  port="$("$PYTHON" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "$2")"
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$1" "$port" >/dev/null 2>&1 &
  INDEX_SERVERS+=("$!")
  for _ in $(seq 50); do
    if "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null; then
      PORT="$port"; return 0
    fi
    sleep 0.1
  done
  die "the local index server for $1 did not start"
}
PORT="${HISTOXPLAIN_INDEX_PORT:-38170}"
for url in $("$PYTHON" -m pip config get global.extra-index-url 2>/dev/null || true); do
  path="${url#file://}"
  if [[ "$url" == file://* && -d "$path" ]]; then
    serve_index "$(dirname "$path")" "$((PORT + 1))"
    PIP_LOCAL_INDEXES="${PIP_LOCAL_INDEXES:+$PIP_LOCAL_INDEXES }http://127.0.0.1:$PORT/$(basename "$path")/"
  fi
done
log "version $VERSION, revision $REVISION; local wheel indexes: ${PIP_LOCAL_INDEXES:-none}"
BUILD_ARGS=(
  --pull=never --force-rm "${CACHE_ARGS[@]}" --ignorefile docker/build.dockerignore --network host
  --secret "id=host-ca,src=$CA_BUNDLE"
  --build-arg "PIP_EXTRA_INDEX_URL=$PIP_LOCAL_INDEXES" --build-arg "PIP_TRUSTED_HOST=${PIP_LOCAL_INDEXES:+127.0.0.1}"
  --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "SOURCE=$SOURCE"
)

timed() {  # timed NAME COMMAND...: runs COMMAND, records its wall time in TIMES
  local start=$SECONDS
  "${@:2}"
  TIMES+=("$1 $((SECONDS - start)) s")
}
TIMES=()

make_debian_base() {
  # Debian 12 minbase, made locally; then what Debian's own container images do: no
  # recommends, no docs or man pages (the copyright files stay), no package caches.
  local rootfs
  rootfs="$(mktemp -d /var/tmp/histoxplain-rootfs.XXXXXX)"
  ROOTFS="$rootfs"
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log"; die "debootstrap failed (log: $OUT/debootstrap.log)"; }
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $DEBIAN_SUITE $DEBIAN_SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $DEBIAN_SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/90histoxplain" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/90histoxplain" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale,lintian}/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old "$rootfs"/debootstrap
  : >"$rootfs/etc/machine-id"
  printf 'histoxplain\n' >"$rootfs/etc/hostname"
  : >"$rootfs/etc/resolv.conf"
  tar --numeric-owner --xattrs -C "$rootfs" -c . \
    | podman import --change 'CMD ["/bin/bash"]' \
        --change "LABEL org.opencontainers.image.description=\"Debian $DEBIAN_SUITE minbase made with debootstrap from $DEBIAN_MIRROR\"" \
        - "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
}

if [[ "${CACHE_ARGS[0]}" == --no-cache ]] || ! podman image exists "$DEBIAN_BASE"; then
  log "Debian $DEBIAN_SUITE minbase with debootstrap from $DEBIAN_MIRROR"
  timed debootstrap-base make_debian_base
else
  log "reusing $DEBIAN_BASE (--no-cache makes it again)"
fi
log "Python base"
timed python-base podman build "${BUILD_ARGS[@]}" --build-arg "DEBIAN_BASE=$DEBIAN_BASE" \
  -f docker/python-base.Dockerfile -t "$PYTHON_BASE" .
log "gateway image"
timed gateway podman build "${BUILD_ARGS[@]}" --build-arg "PYTHON_BASE=$PYTHON_BASE" \
  -f docker/gateway.Dockerfile -t "$GATEWAY" .
log "TorchServe image"
timed torchserve podman build "${BUILD_ARGS[@]}" --build-arg "PYTHON_BASE=$PYTHON_BASE" \
  -f docker/torchserve.Dockerfile -t "$TORCHSERVE" .

# Package lists (pip freeze of the venv, which has no pip: read from its metadata; Debian's dpkg).
FREEZE='import importlib.metadata as m
print("\n".join(sorted("%s==%s" % (d.metadata["Name"], d.version) for d in m.distributions())))'
for image in "$GATEWAY" "$TORCHSERVE"; do
  name="${image#localhost/}"; name="${name/:/-}"
  podman run --rm --pull=never --network=none --entrypoint python "$image" -c "$FREEZE" >"$OUT/$name.pip-freeze.txt"
  podman run --rm --pull=never --network=none --entrypoint dpkg-query "$image" \
    -W -f '${Package}=${Version} ${Status}\n' | awk '$NF == "installed" {print $1}' >"$OUT/$name.dpkg.txt"
done
if grep -qiE '^(torch|torchvision|timm|onnxruntime|triton)==' "$OUT/histoxplain-gateway-$VERSION.pip-freeze.txt"; then
  die "the gateway image contains a model package: $(grep -iE '^(torch|timm|onnxruntime)==' "$OUT/histoxplain-gateway-$VERSION.pip-freeze.txt" | tr '\n' ' ')"
fi

log "layer check (every file of every layer)"
timed layer-check "$PYTHON" docker/check_image_layers.py --ca-bundle "$CA_BUNDLE" --out "$OUT" \
  --expect-version "$VERSION" --pins requirements.txt requirements-gateway.txt docker/requirements-build.txt \
  -- "$GATEWAY" "$TORCHSERVE"

echo
echo "image sizes (MB = 10^6 bytes, uncompressed, as podman reports them):"
for image in "$GATEWAY" "$TORCHSERVE" "$PYTHON_BASE"; do
  bytes="$(podman image inspect --format '{{.Size}}' "$image")"
  printf '  %-38s %6d MB\n' "${image#localhost/}" "$((bytes / 1000000))"
done
echo "stage times:"
printf '  %s\n' "${TIMES[@]}"
echo "package lists and layer reports: $OUT/"
