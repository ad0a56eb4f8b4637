# syntax=docker/dockerfile:1
#
# llmq: one image for every role. The same binary runs the worker (`llmq run`,
# the default command), the mock upstream (`llmq mock-llm`), the CLI publisher
# (`llmq publish`) and the health-check helper (`llmq probe URL`).
#
#   docker build -t llmq:local .
#   docker run --rm llmq:local --help

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
# Debian bookworm on both sides, so the binary's glibc matches the runtime's.
FROM rust:1-bookworm AS builder

WORKDIR /build

# 1. Dependencies only. With just the manifests and empty targets, this layer
#    is rebuilt only when Cargo.toml or Cargo.lock change, not on every edit
#    under src/.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && : > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# 2. The real sources. The dummy crate's artifacts are deleted because cargo
#    compares modification times, and COPY may keep timestamps older than the
#    dummy files just built: without this, cargo could keep the empty binary.
#    The commit `llmq --version` names (build.rs): the context has no .git, so
#    it comes as a build argument, e.g.
#    docker build --build-arg LLMQ_COMMIT="$(git rev-parse --short=12 HEAD)" .
ARG LLMQ_COMMIT=unknown
COPY src ./src
RUN rm -rf target/release/.fingerprint/llmq-* \
           target/release/deps/llmq-* \
           target/release/deps/libllmq-* \
           target/release/llmq \
    && cargo build --release --locked \
    && cp target/release/llmq /usr/local/bin/llmq

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: TLS to real LLM APIs (rustls reads the system's roots).
# Nothing else: no curl or wget; health checks use `llmq probe URL` instead.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid so volume permissions and Kubernetes
# `runAsNonRoot`/`runAsUser` policies can rely on it.
# (Not --system: that range ends at 999 and useradd would warn about 10001.)
RUN groupadd --gid 10001 llmq \
    && useradd --uid 10001 --gid llmq --no-create-home \
               --home-dir /app --shell /usr/sbin/nologin llmq

COPY --from=builder /usr/local/bin/llmq /usr/local/bin/llmq

WORKDIR /app
# Read as ./config.toml from the working directory; every key can still be
# overridden with LLMQ_* environment variables (e.g. LLMQ_AMQP__URL).
COPY config.toml /app/config.toml

USER 10001:10001

# Port reserved for the worker's HTTP endpoint (metrics / health). EXPOSE is
# documentation only; nothing is published unless a compose file asks for it.
EXPOSE 9090

ENTRYPOINT ["llmq"]
CMD ["run"]
