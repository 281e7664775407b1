# Sourced by the test scripts: one way to say that something did not run.
#
#   skipped STAGE WHY   prints "SKIPPED: STAGE: WHY" and, when EGRESS_SKIP_LOG names a file (scripts/test.sh sets
#                       it), appends "STAGE: WHY" to it, so that the caller's summary lists it and its exit status
#                       counts it.
#
# A script run on its own that skipped what it exists to do exits with SKIP_STATUS (77, the "skipped" status of
# automake's test driver), never 0.
SKIP_STATUS=77

skipped() {
  printf 'SKIPPED: %s: %s\n' "$1" "$2"
  if [[ -n ${EGRESS_SKIP_LOG:-} ]]; then
    printf '%s: %s\n' "$1" "$2" >>"$EGRESS_SKIP_LOG"
  fi
}
