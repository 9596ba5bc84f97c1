#!/usr/bin/env bash
# Vigil's Kafka consumer against a real Kafka-protocol broker on loopback, beside a bare consumer
# of the same librdkafka reading the same topic from it (issue 23's "≥ 80 % of a bare consumer").
#
# The broker is Tansu (crates.io `tansu`, Apache-2.0), a Kafka-protocol broker with in-memory
# storage: the only one this machine kind can install (no Apache Kafka or Redpanda from its
# registries). It runs as a process of its own on the same cores as the harness, as a broker on
# the host would. The first run installs it (≈ 15 minutes on 2 cores) under $TANSU_ROOT.
#
# Run: bash benches/real_broker.sh [kafka_apply arguments, e.g. --messages 600000 or
#      --every-message-revokes --messages 200000]
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU_ROOT=${TANSU_ROOT:-$HOME/.cache/vigil-bench/tansu}
PORT=${PORT:-19092}
if ! [ -x "$TANSU_ROOT/bin/tansu" ]; then
    cargo install tansu --version 0.6.0 --features dynostore --root "$TANSU_ROOT"
fi
"$TANSU_ROOT/bin/tansu" broker --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --silent &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
done
# The broker's CPU (user + system, clock ticks) before and after: it is not in the harness's.
ticks() { awk '{print $14 + $15}' "/proc/$broker/stat"; }
before=$(ticks)
cargo bench --locked --bench kafka_apply -- --compare --brokers "127.0.0.1:$PORT" "$@"
awk -v a="$before" -v b="$(ticks)" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "broker CPU during the run: %.2f s\n", (b - a) / hz }'
