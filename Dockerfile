# syntax=docker/dockerfile:1
# report-relay: build with the Rust toolchain, run on slim Debian as a non-root user.
# TLS is rustls with webpki-roots built in, so the image needs neither OpenSSL nor
# ca-certificates (which would pull in openssl).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# ring (rustls' crypto) and bundled SQLite need a C compiler, which the image has.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# schema.json is compiled in (include_str!); the bench target must exist for cargo to read the
# manifest, though it is not built here.
COPY seatable-schema ./seatable-schema
COPY benches ./benches
RUN cargo build --release --locked \
 && ! ldd target/release/report-relay | grep -Ei 'libssl|libcrypto'

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/report-relay --no-create-home relay \
 && mkdir -p /var/lib/report-relay /etc/report-relay \
 && chown relay:relay /var/lib/report-relay
COPY --from=build /src/target/release/report-relay /usr/local/bin/report-relay
COPY docker/config.yaml /etc/report-relay/config.yaml
COPY seatable-schema /usr/share/report-relay/seatable-schema
USER relay
VOLUME /var/lib/report-relay
EXPOSE 9464
ENTRYPOINT ["report-relay", "run", "--config", "/etc/report-relay/config.yaml"]
