# herdsman container image: one static binary on `scratch`, under 8 MB (BENCHMARKS.md).
#
#   docker build -t herdsman .                     # anywhere with registry access
#   docker run -p 8080:8080 herdsman               # PORT=8080 unless the platform sets it
#
# Stages, in this order on purpose:
#
#   base               FROM scratch: /etc/passwd, /etc/group, /etc/nsswitch.conf and all the
#                      image metadata (USER 10001, EXPOSE, ENV PORT, STOPSIGNAL, HEALTHCHECK,
#                      ENTRYPOINT). Both final stages inherit it, so they cannot drift apart.
#   runtime-from-host  base + a binary that was built on the host (`--build-arg HOST_ROOTFS=dir`,
#                      a directory inside the build context laid out like the image root:
#                      dir/herdsman).
#                      tests/docker.rs and bench/image-size.sh use it on machines that cannot pull.
#   build              rust:1-bookworm: a statically linked herdsman (+crt-static, glibc; TLS is
#                      rustls, no OpenSSL), a static PIE whose relocations build.rs packs
#                      (DT_RELR: 0.25 MB smaller, ASLR kept) and whose identical functions
#                      rust-lld folds (42 kB; Cargo.toml's profile and build.rs say why).
#   runtime            base + what `build` produced. The last stage: what `docker build .` gives.
#
# Why the host stage comes before `build`: the legacy builder (Docker 20.10 without buildx,
# DOCKER_BUILDKIT=0, which is what the test machine has) walks the stages in file order up to
# the --target and pulls each base image as it reaches it. Measured on 20.10.24: with
# `--target runtime-from-host` placed after `build`, it fails on `FROM rust:1-bookworm` when no
# registry is reachable; placed before, it never reaches that line and needs nothing but
# `scratch`. BuildKit builds only the stages the target depends on, so the order does not
# matter there, and a plain `docker build .` (BuildKit or legacy) builds `runtime`.
# With the legacy builder a plain build also runs `runtime-from-host` on the way; its default
# HOST_ROOTFS is the committed deploy/docker/rootfs, so that costs nothing and needs no binary.
#
# No `RUN --mount` cache mounts: the legacy builder cannot parse them. Dependencies get their own
# layer instead (Cargo.toml + Cargo.lock with placeholder sources).
#
# No CA bundle: nothing in herdsman reads one. The Redis client's roots for `rediss://` are
# compiled in (redis's `tls-rustls-webpki-roots` feature, which replaces the native-certs
# loading), and REDIS_CA_CERT names a file the user adds. It was 0.2 MB of the image.
#
# Host names resolve in this image: a static glibc cannot load NSS modules, but glibc >= 2.34
# (bookworm: 2.36) has `files` and `dns` built in. tests/docker.rs proves it by reaching Redis by
# container name on a user-defined network; deploy/docker/rootfs/etc/nsswitch.conf only makes
# the order (/etc/hosts, then DNS) explicit.

FROM scratch AS base
COPY deploy/docker/rootfs/ /
USER 10001:10001
EXPOSE 8080
ENV PORT=8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["/herdsman", "healthcheck"]
ENTRYPOINT ["/herdsman"]

FROM base AS runtime-from-host
ARG HOST_ROOTFS=deploy/docker/rootfs
COPY ${HOST_ROOTFS}/ /

FROM rust:1-bookworm AS build
WORKDIR /src
ENV RUSTFLAGS="-C target-feature=+crt-static" CARGO_TERM_COLOR=never
# Dependencies only: rebuilt when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin herdsman --target "$(rustc -vV | sed -n 's/^host: //p')" \
 && rm -rf src
COPY . .
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin herdsman --target "$target" \
 && install -D -m 0755 "target/$target/release/herdsman" /out/herdsman \
 && if readelf -d /out/herdsman | grep -q NEEDED; then echo "herdsman is not static" >&2; exit 1; fi \
 && /out/herdsman --version

FROM base AS runtime
COPY --from=build /out/ /
