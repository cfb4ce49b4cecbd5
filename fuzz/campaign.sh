#!/usr/bin/env bash
# A fuzzing campaign: every target (or the ones named) for a fixed time each, one after another,
# starting from the seeds in fuzz/corpus/TARGET (read only) and a working corpus kept between
# campaigns in fuzz/campaigns/corpus/TARGET (not committed; crashes go to fuzz/artifacts/TARGET). Prints one table row per target: executions, coverage (libFuzzer's
# `cov`, edges), features (`ft`), corpus size, and findings.
#
#   fuzz/campaign.sh 600                    # 10 minutes per target, all targets
#   fuzz/campaign.sh 600 envelope codec     # only these
#   FUZZ_BINS=/dir fuzz/campaign.sh 600     # prebuilt binaries (cargo fuzz build) from /dir
#
# Each run appends to fuzz/campaigns/LOG (raw libFuzzer output in fuzz/campaigns/TARGET-*.log).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
seconds="${1:?seconds per target}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(grpc_walker command_targets bearer codec envelope metadata config)
fi
bins="${FUZZ_BINS:-$here/target/x86_64-unknown-linux-gnu/release}"
if [ -z "${FUZZ_BINS:-}" ]; then
  (cd "$here" && RUSTC_BOOTSTRAP=1 cargo fuzz build "${targets[@]/#/}" >/dev/null 2>&1 ||
    (cd "$here" && RUSTC_BOOTSTRAP=1 cargo fuzz build))
fi
mkdir -p "$here/campaigns"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
printf '| target | seconds | executions | exec/s | cov | ft | corpus | findings |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for target in "${targets[@]}"; do
  log="$here/campaigns/$target-$stamp.log"
  work="$here/campaigns/corpus/$target"
  mkdir -p "$work" "$here/artifacts/$target"
  status=0
  "$bins/$target" "$work" "$here/corpus/$target" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$here/artifacts/$target/" -rss_limit_mb=2048 >"$log" 2>&1 || status=$?
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
  last="$(grep -E '#[0-9]+.*(pulse|NEW|REDUCE|DONE)' "$log" | tail -1)"
  cov="$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")"
  ft="$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")"
  corp="$(sed -n 's/.*corp: \([0-9]*\).*/\1/p' <<<"$last")"
  rate=$(( ${execs:-0} / seconds ))
  findings=0
  if [ "$status" -ne 0 ]; then findings="exit $status (see $log)"; fi
  row="| $target | $seconds | ${execs:-?} | $rate | ${cov:-?} | ${ft:-?} | ${corp:-?} | $findings |"
  printf '%s\n' "$row"
  printf '%s %s\n' "$stamp" "$row" >>"$here/campaigns/LOG"
done
