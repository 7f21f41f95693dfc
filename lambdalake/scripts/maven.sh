# Sourced by the fetch scripts: resolve Maven artifacts and their runtime dependencies.

# maven_copy_dependencies OUTDIR GROUP:ARTIFACT:VERSION...
#   Copies the artifacts and their runtime dependencies into OUTDIR (created).
maven_copy_dependencies() {
  local out="$1" work dependencies="" coordinate group artifact version
  shift
  command -v mvn >/dev/null || { echo "mvn not found on PATH" >&2; return 1; }
  work="$(mktemp -d)"
  for coordinate in "$@"; do
    IFS=: read -r group artifact version <<<"$coordinate"
    dependencies+="<dependency><groupId>$group</groupId><artifactId>$artifact</artifactId>"
    dependencies+="<version>$version</version></dependency>"
  done
  cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>lambdalake</groupId><artifactId>fetch</artifactId><version>1</version>
  <dependencies>$dependencies</dependencies>
</project>
POM
  # (sed drops the stray colour resets that Debian's mvn prints even in -B -q mode)
  mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$out" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2
  local status="${PIPESTATUS[0]}"
  rm -rf "$work"
  return "$status"
}
