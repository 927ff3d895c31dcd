# syntax=docker/dockerfile:1.7
#
# One image for the controller and the migration runner: a static (musl) schemagate binary
# in a distroless base with CA certificates, a non-root user and nothing else (no shell,
# no package manager). Build: docker build -t schemagate .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-alpine3.22 AS build
# The C parts (the bundled SQLite, ring) build against musl; the result links statically.
RUN apk add --no-cache musl-dev=~1.2
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin schemagate \
 && install -D -m 0755 target/release/schemagate /out/schemagate

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="schemagate" \
      org.opencontainers.image.description="Versioned, locked, audited schema migrations; Kubernetes operator and CLI" \
      org.opencontainers.image.source="https://github.com/schemagate/schemagate" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/schemagate /usr/local/bin/schemagate
# distroless's nonroot user; the chart and the injected runners also set it explicitly.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/schemagate"]
CMD ["--help"]
