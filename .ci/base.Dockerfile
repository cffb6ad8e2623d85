# CI only: a stand-in for the Dockerfile's python base, made on a machine that reaches Debian's
# archive and PyPI but no image registry (.ci/image imports localhost/debian:bookworm first).
FROM localhost/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
# This machine's extra CA certificates, which its HTTPS to PyPI needs.
COPY *.crt /usr/local/share/ca-certificates/
RUN update-ca-certificates
# As in the python image: a UTF-8 locale, and pip free to install into the system Python
# (Debian's pip refuses that by default, PEP 668).
ENV LANG=C.UTF-8 \
    PIP_BREAK_SYSTEM_PACKAGES=1
