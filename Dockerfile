# syntax=docker/dockerfile:1
#
#   docker build -t qmpmux .
#
# See docs/operations.md ("Docker") for `docker run`. The QEMU socket
# directory and the config are mounted from the host; paths in the config
# are paths inside the container.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and build artefacts between builds;
# the binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/qmpmux /out/qmpmux \
 && strip --strip-debug /out/qmpmux

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="qmpmux" \
      org.opencontainers.image.description="Multiplex one QEMU QMP monitor socket among any number of clients" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.source="https://github.com/qmpmux/qmpmux"
RUN groupadd --system --gid 10001 qmpmux \
 && useradd --system --uid 10001 --gid qmpmux --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin qmpmux \
 && install -d -o qmpmux -g qmpmux -m 0755 /run/qmpmux
COPY --from=build /out/qmpmux /usr/local/bin/qmpmux
# An example; mount your own over it (or over /etc/qmpmux).
COPY config/qmpmux.toml /etc/qmpmux/qmpmux.toml
# Runs as this unprivileged user unless `docker run --user` says otherwise:
# it must be allowed to connect to the QEMU sockets (write permission on
# them) and to create sockets in /run/qmpmux.
USER qmpmux
VOLUME ["/run/qmpmux"]
# SIGTERM (docker stop) is a clean stop: clients are disconnected within 5 s
# and the listening sockets are removed.
STOPSIGNAL SIGTERM
# Healthy while the daemon answers on its control socket (`qmpmux status`
# finds it through the config at /etc/qmpmux/qmpmux.toml, as the daemon).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["qmpmux", "status"]
ENTRYPOINT ["qmpmux"]
CMD ["--config", "/etc/qmpmux/qmpmux.toml"]
