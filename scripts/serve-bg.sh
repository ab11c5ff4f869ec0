# Sourced by the scripts that drive a server (training, evaluation, benchmarks): starts
# "$BIN serve" in the background with the given arguments, stops it when the script exits, and
# waits until its models are Ready.  Usage: serve_bg URL LOGFILE [serve arguments...]
serve_bg() {
  local url=$1 log=$2
  shift 2
  "$BIN" serve "$@" > "$log" 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq 120); do
    "$BIN" models --server "$url" 2>/dev/null | grep -q Ready && return 0
    sleep 1
  done
  echo "the server at $url did not become ready; see $log" >&2
  return 1
}
