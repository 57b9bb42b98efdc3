# iothubd container image.
#
#   docker build -t iothubd .
#   docker run -p 8883:8883 -p 5671:5671 -p 443:443 -p 9090:9090 -v iothubd-data:/data iothubd
#
# The dev CA that SDK clients must trust is created in /data/tls/ca.pem on first start
# (`docker cp <container>:/data/tls/ca.pem .`), unless certificate files are configured.
# docker-compose.yml runs it with PostgreSQL, RabbitMQ and Prometheus.

# --- skeleton: the manifests and lockfile with stub sources, so the dependency layer below is
# rebuilt only when dependencies change, not at every source edit (the idea of cargo-chef).
FROM rust:1.95-bookworm AS skeleton
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
WORKDIR /src
COPY . .
# Targets declared in a manifest ([[bench]] name = …) must exist even when not built, so the
# files under benches/, tests/ and examples/ are kept as empty placeholders.
RUN mkdir /skeleton && cp Cargo.lock /skeleton/ \
 && find . -name Cargo.toml -not -path './target/*' -print0 | while IFS= read -r -d '' manifest; do \
      dir=$(dirname "$manifest"); \
      mkdir -p "/skeleton/$dir/src"; \
      cp "$manifest" "/skeleton/$dir/"; \
      if [[ -f $dir/src/lib.rs ]]; then : > "/skeleton/$dir/src/lib.rs"; fi; \
      if [[ -f $dir/src/main.rs ]]; then echo 'fn main() {}' > "/skeleton/$dir/src/main.rs"; fi; \
      (cd "$dir" && find benches tests examples -name '*.rs' 2>/dev/null || true) | while IFS= read -r target; do \
        mkdir -p "/skeleton/$dir/$(dirname "$target")"; \
        : > "/skeleton/$dir/$target"; \
      done; \
    done

# --- builder
FROM rust:1.95-bookworm AS builder
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
WORKDIR /src
COPY --from=skeleton /skeleton/ ./
# Dependency layer: compiles every dependency of the binary against the stubs.
RUN cargo build --release --locked --bin iothubd
COPY . .
# The copied sources may be older than the stub build; make cargo see them as changed.
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bin iothubd \
 && cp target/release/iothubd /usr/local/bin/iothubd

# --- runtime
FROM debian:bookworm-slim
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin iothubd \
 && mkdir -p /data \
 && chown iothubd:iothubd /data
COPY --from=builder /usr/local/bin/iothubd /usr/local/bin/iothubd
# The SDKs dial 443 (HTTPS, WebSockets); this file capability lets the non-root user bind it
# wherever the runtime does not already allow unprivileged ports below 1024.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin \
 && setcap cap_net_bind_service=+ep /usr/local/bin/iothubd \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
USER iothubd
WORKDIR /data
VOLUME ["/data"]
# MQTT/TLS, AMQP/TLS, HTTPS, Prometheus metrics.
EXPOSE 8883 5671 443 9090
ENTRYPOINT ["iothubd", "serve", "--data-dir", "/data"]
