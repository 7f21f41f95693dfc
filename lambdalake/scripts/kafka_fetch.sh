#!/usr/bin/env bash
# Fetch an Apache Kafka broker (jars only, no Docker) from Maven Central.
#
#   lambdalake/scripts/kafka_fetch.sh            # -> ${LAMBDALAKE_CACHE:-~/.cache/lambdalake}/kafka-<v>/libs
#   KAFKA_VERSION=4.3.1 lambdalake/scripts/kafka_fetch.sh
#
# Idempotent: a marker file makes the second run a no-op. The last line printed is the libs dir.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
# kafka_2.13 ships log4j-core but no SLF4J binding; this bridge must match its log4j version.
LOG4J_VERSION="${LOG4J_VERSION:-2.25.5}"
CACHE="${LAMBDALAKE_CACHE:-$HOME/.cache/lambdalake}"
HOME_DIR="$CACHE/kafka-$KAFKA_VERSION"
LIBS="$HOME_DIR/libs"
MARKER="$HOME_DIR/.fetched"

# Concurrent first runs (parallel tests) wait for each other instead of racing.
mkdir -p "$CACHE"
exec 9>"$HOME_DIR.lock"
flock 9
if [[ -f "$MARKER" ]]; then
  echo "$LIBS"
  exit 0
fi

command -v java >/dev/null || { echo "kafka_fetch: java not found on PATH" >&2; exit 1; }
source "$(dirname "${BASH_SOURCE[0]}")/maven.sh"

echo "kafka_fetch: resolving kafka_2.13:$KAFKA_VERSION and its runtime dependencies..." >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
maven_copy_dependencies "$work/libs" "org.apache.kafka:kafka_2.13:$KAFKA_VERSION" \
  "org.apache.logging.log4j:log4j-slf4j-impl:$LOG4J_VERSION"
rm -rf "$LIBS"
mkdir -p "$HOME_DIR"
mv "$work/libs" "$LIBS"

touch "$MARKER"
echo "kafka_fetch: $(find "$LIBS" -name '*.jar' | wc -l) jars" >&2
echo "$LIBS"
