# The common base of both images: Debian 12 (bookworm) minbase plus Debian's Python 3.11, nothing
# else. docker/build-images.sh makes DEBIAN_BASE locally with debootstrap (no registry is needed
# or reachable) and tags this image localhost/histoxplain-python:3.11-bookworm.
#
# Debian package versions are pinned here and in the two application Dockerfiles. Debian's
# archive keeps only the newest build of a package, so a security update makes a pinned install
# fail with "Version ... was not found": bump the pin (apt-cache madison PACKAGE) and rebuild.
ARG DEBIAN_BASE=localhost/histoxplain-debian:bookworm-minbase
FROM ${DEBIAN_BASE}

ARG PYTHON_DEB_VERSION=3.11.2-6+deb12u9
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="histoxplain-python" \
      org.opencontainers.image.description="Debian 12 minbase (debootstrap) with Debian's Python 3.11" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# python3.11 depends on python3.11-minimal and libpython3.11-stdlib of exactly its own version.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "python3.11=${PYTHON_DEB_VERSION}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt/* /var/log/dpkg.log

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1
CMD ["python3.11"]
