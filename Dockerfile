# The egress gateway image: one statically linked binary, `/egress-gateway`, in an otherwise empty image. The
# same image runs the gateway pods (`egress-gateway run`) and the node agent DaemonSet (`egress-gateway node`).
# See docs/deploy.md.
#
# Two ways to build it:
#
#   docker build -t egress-gateway .        # compiles in the official Rust image (needs to pull it)
#
#   scripts/image.sh                        # no pull: compiles on the host (static glibc), then
#   podman build --build-arg BINARY_FROM=host-binary -t egress-gateway .    # copies target/image/egress-gateway
#
# The runtime stage is `scratch`: no shell, no libc, no /etc/passwd. It runs as uid/gid 65532 (the non-root user
# distroless uses) and writes nothing, so it works with readOnlyRootFilesystem. It needs CAP_NET_RAW (AF_PACKET
# sockets on the uplinks) and CAP_NET_ADMIN (socket buffers beyond net.core.*mem_max for the gateway; netlink
# routes, rules, links and /proc/sys/net for the node agent) — docs/deploy.md says why, in detail.

# Which stage provides /out/egress-gateway: `build` (compile here) or `host-binary` (copy a host build).
ARG BINARY_FROM=build
ARG RUST_VERSION=1.95

# --- build: the official Rust image (Debian bookworm), static glibc binary --------------------------------------
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Static glibc (crt-static) needs an explicit --target, so that proc macros and build scripts stay dynamic.
# Neither command resolves host names (the node agent reaches the API server at the in-cluster service IP,
# KUBERNETES_SERVICE_HOST), so static glibc's NSS limitation does not apply. Debug info is dropped
# (the workspace profile keeps it for profiling); symbols stay, so a panic's backtrace names functions.
ENV RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release -p gateway --locked --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/egress-gateway /out/egress-gateway \
 && /out/egress-gateway --version
# File capabilities, permitted only (not effective): the image's non-root user gets NET_ADMIN and NET_RAW at
# exec, as far as the container's capability set allows, and the binary raises them itself
# (gateway/src/caps.rs). COPY keeps them. Needs `allowPrivilegeEscalation: true` in the pod (docs/deploy.md).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libcap2-bin \
 && setcap cap_net_admin,cap_net_raw=p /out/egress-gateway && getcap /out/egress-gateway

# --- host-binary: the binary scripts/image.sh built on the host (no image pull needed) --------------------------
FROM scratch AS host-binary
COPY target/image/egress-gateway /out/egress-gateway

# --- the binary, from whichever stage BINARY_FROM names ----------------------------------------------------------
FROM ${BINARY_FROM} AS binary

# --- runtime -----------------------------------------------------------------------------------------------------
FROM scratch AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="egress-gateway" \
      org.opencontainers.image.description="Userspace egress gateway for Kubernetes (Calico-compatible VXLAN tunnel, SNAT to fixed egress IPs) and its node agent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md" \
      org.opencontainers.image.base.name="scratch"
COPY --from=binary /out/egress-gateway /egress-gateway
USER 65532:65532
# VXLAN from the nodes, /readiness + /livez, /metrics (the configuration's defaults).
EXPOSE 4790/udp 8080/tcp 9090/tcp
ENTRYPOINT ["/egress-gateway"]
CMD ["run", "--config", "/etc/egress/gateway.yaml"]
