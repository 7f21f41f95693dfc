#!/usr/bin/env bash
# Fetch the s3a connector (hadoop-aws) matching the Hadoop inside the installed pyspark wheel,
# plus the AWS SDK v2 bundle it declares, from Maven Central.
#
#   PYTHON=.venv/bin/python lambdalake/scripts/spark_jars.sh     # -> ${LAMBDALAKE_CACHE:-~/.cache/lambdalake}/spark-jars-<hadoop>/
#
# Jars already shipped in pyspark/jars are left out. Idempotent: a marker file makes the second
# run a no-op. The last line printed is the comma-separated jar paths, ready for `spark.jars`.
set -euo pipefail

PYTHON="${PYTHON:-python3}"  # the interpreter whose pyspark the jars must match
PYSPARK_JARS="${PYSPARK_JARS:-$("$PYTHON" -c \
  'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')}"

api_jar="$(find "$PYSPARK_JARS" -maxdepth 1 -name 'hadoop-client-api-*.jar' | head -n1)"
[[ -n "$api_jar" ]] || { echo "spark_jars: no hadoop-client-api jar in $PYSPARK_JARS" >&2; exit 1; }
HADOOP_VERSION="$(basename "$api_jar" .jar)"
HADOOP_VERSION="${HADOOP_VERSION#hadoop-client-api-}"

CACHE="${LAMBDALAKE_CACHE:-$HOME/.cache/lambdalake}"
DEST="$CACHE/spark-jars-$HADOOP_VERSION"
MARKER="$DEST/.fetched"

list_jars() { find "$DEST" -maxdepth 1 -name '*.jar' | sort | paste -sd, -; }

# Concurrent first runs (parallel tests) wait for each other instead of racing.
mkdir -p "$CACHE"
exec 9>"$DEST.lock"
flock 9
if [[ -f "$MARKER" ]]; then
  list_jars
  exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/maven.sh"

echo "spark_jars: resolving hadoop-aws:$HADOOP_VERSION and the AWS SDK it declares..." >&2
# hadoop-aws brings the SDK bundle (software.amazon.awssdk:bundle), and since Hadoop 3.4.2
# analyticsaccelerator-s3; its other dependencies are provided by pyspark's hadoop-client-*.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
maven_copy_dependencies "$work/jars" "org.apache.hadoop:hadoop-aws:$HADOOP_VERSION"

# Drop anything pyspark already ships (same artifact, any version).
for jar in "$work"/jars/*.jar; do
  artifact="$(basename "$jar" .jar | sed -E 's/-[0-9][^-]*(-[A-Za-z]+)?$//')"
  if compgen -G "$PYSPARK_JARS/$artifact-[0-9]*.jar" >/dev/null; then
    rm -f "$jar"
  fi
done

rm -rf "$DEST"
mv "$work/jars" "$DEST"
touch "$MARKER"
echo "spark_jars: $(find "$DEST" -name '*.jar' | wc -l) jars for Hadoop $HADOOP_VERSION" >&2
list_jars
