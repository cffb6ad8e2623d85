# The CUDA image that runs the DVC pipeline; README.md ("Docker and GitHub Actions") gives the
# commands, and scripts/image.sh runs them. The repository is not baked in: a run mounts the
# checkout at /work and runs as its owner, so outputs belong to them and git trusts the checkout.
#
# BASE defaults to python:3.11.14-slim-bookworm, pinned by the digest of its multi-architecture
# index; any Debian bookworm image with python3 and pip can stand in (--build-arg BASE=...). No
# CUDA toolkit is needed here: PyPI's Linux torch wheel is a CUDA build whose nvidia-*
# dependencies carry the CUDA runtime, cuBLAS and cuDNN, and `--gpus all` (the NVIDIA container
# toolkit) brings the host's driver.
ARG BASE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
FROM ${BASE}

# DVC needs git. Debian's archive keeps only the newest build of a package in a release, so an
# exact version pin would break the build at the next security update; the release (bookworm)
# is fixed by the digest above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# Dependencies before code, so this layer is rebuilt only when requirements.txt changes. The
# same two installs as the README's quick start; the package itself is imported from the mount.
# wheels/ is a local wheelhouse, mounted for the install only (it adds nothing to the image): a
# wheel there wins over PyPI's of the same version, e.g. torch 2.13.0+cpu for a CPU-only image.
# Air-gapped, put every wheel there and build with --build-arg PIP_NO_INDEX=1.
ARG PIP_NO_INDEX=0
# pip warns of installing as root, which in an image build is the norm: the warning is dropped.
ARG PIP_ROOT_USER_ACTION=ignore
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=bind,source=wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels torch==2.13.0 \
    && pip install --no-cache-dir --find-links /wheels -r /tmp/requirements.txt

# A run passes --user with the host's uid, which has no entry in /etc/passwd: HOME is set here
# and writable by any uid, so caches (corpus, tiktoken, matplotlib) have a place to go. ~/.cache
# exists too: a volume mounted below it would otherwise make it root's, and matplotlib's cache
# could not be written. The system-wide safe.directory keeps `dvc metrics diff` working when a
# run forgets --user and the checkout's owner differs from the process's.
RUN groupadd --gid 10001 neuromanifold \
    && useradd --create-home --home-dir /home/neuromanifold --uid 10001 --gid 10001 neuromanifold \
    && chmod 1777 /home/neuromanifold \
    && install -d -m 1777 /home/neuromanifold/.cache \
    && git config --system --add safe.directory /work
ENV HOME=/home/neuromanifold \
    PYTHONPATH=/work \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER 10001:10001
WORKDIR /work
CMD ["dvc", "repro"]
