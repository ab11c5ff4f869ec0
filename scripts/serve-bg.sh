# Sourced by the scripts that drive a server (training, evaluation, benchmarks): starts
# "$BIN serve" in the background with the given arguments, stops it when the script exits, and
# waits until READY_MODELS of its models (default 1) are Ready, for at most READY_TIMEOUT seconds
# (default 300: full-size checkpoints take a while to load and warm up on 2 cores).
# Usage: serve_bg URL LOGFILE [serve arguments...]; the server's output is appended to LOGFILE
# (a resumed run keeps the earlier log) and its pid is in SERVER_PID.
serve_bg() {
  local url=$1 log=$2
  shift 2
  "$BIN" serve "$@" >> "$log" 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq "${READY_TIMEOUT:-300}"); do
    [ "$("$BIN" models --server "$url" 2>/dev/null | grep -c Ready)" -ge "${READY_MODELS:-1}" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 1
  done
  echo "the server at $url did not become ready; see $log" >&2
  return 1
}
