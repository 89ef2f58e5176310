#!/usr/bin/env bash
# Smoke test of the container deployment, for real: builds the images, runs docker-compose.yml
# with several embedder replicas, checks it from the host, and tears everything down.
#
#   deploy/smoke.sh                 # podman + podman-compose (bash ../shared/tools/container-runtime.sh)
#   ENGINE=docker COMPOSE="docker compose" deploy/smoke.sh
#   deploy/smoke.sh --plain-up      # instead: one plain `compose up -d` (no staged start), then the checks
#
# Options: --no-build (reuse the images), --keep (leave the stack running), --embedders N (3).
# What it checks (each step prints ok/FAIL; the first FAIL stops it, after the teardown):
#   promtool accepts prometheus.yml and the alert rules (and the rules' unit tests pass);
#   every image: non-root, no compiler; the indexer, gateway and UI images have no TensorFlow;
#   the indexer started without a bundle is not healthy, says why in its log, and the gateway's
#   GetStatus reports it (searches answer UNAVAILABLE);
#   the one-shot indexer-build service indexes demo/photos through the embedder replicas;
#   searches through the gateway from the host find each query photo first, and the Embed calls
#   are spread over every embedder replica (each replica's own /metrics);
#   one embedder replica killed (SIGKILL) during a search run: at most the searches in flight fail,
#   with UNAVAILABLE; once restarted, the replica answers Embed calls again;
#   scaling the running stack (one more embedder, a second indexer on the same read-only bundle):
#   the gateway finds the new replicas by itself and they answer calls;
#   the stack's Prometheus has every target up (one per replica), recorded the search latencies,
#   and evaluates every dashboard and alert expression; the UI answers.
# Grafana is in docker-compose.yml for users but is not started here (no image on this machine).
# Published ports are on 127.0.0.1 only; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-podman}
COMPOSE=${COMPOSE:-podman-compose}
PROJECT=${CBIR_SMOKE_PROJECT:-cbir-smoke}
EMBEDDERS=3
BUILD=1
KEEP=0
PLAIN=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --plain-up) PLAIN=1 ;;
    --embedders) EMBEDDERS=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

# Host ports away from the local demo's defaults, so both can run on one machine.
export CBIR_PUBLISH_ADDRESS=127.0.0.1
export CBIR_GATEWAY_PORT=${SMOKE_GATEWAY_PORT:-51050}
export CBIR_GATEWAY_METRICS_PORT=${SMOKE_GATEWAY_METRICS_PORT:-51100}
export CBIR_UI_PORT=${SMOKE_UI_PORT:-51060}
export PROMETHEUS_PORT=${SMOKE_PROMETHEUS_PORT:-51090}
export CBIR_PHOTOS=./demo/photos CBIR_BUNDLE_NAME=demo CBIR_INDEXER_POLL_SECONDS=2
export BUILDAH_FORMAT=docker   # podman: keep HEALTHCHECK in the images (OCI images cannot hold it)
PROMETHEUS_VERSION=$(sed -n 's/.*image: prom\/prometheus:\${PROMETHEUS_VERSION:-\([^}]*\)}.*/\1/p' docker-compose.yml)
export PROMETHEUS_VERSION

GATEWAY=127.0.0.1:$CBIR_GATEWAY_PORT
PROM=http://127.0.0.1:$PROMETHEUS_PORT
UI=http://127.0.0.1:$CBIR_UI_PORT
PY=.venv/bin/python
CBIR=.venv/bin/cbir
WORK=$(mktemp -d /tmp/cbir-smoke.XXXXXX)
STACK=(weights embedder indexer gateway ui prometheus)   # everything but indexer-build and grafana

step() { printf '\n== [%4ss] %s\n' "$SECONDS" "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; exit 1; }
compose() { $COMPOSE -p "$PROJECT" "$@"; }
quiet() { grep -v -e 'systemd connection' -e '^time=.*level=warning' || true; }   # podman 4.3 noise
containers() {  # names of a service's running containers, in replica order
  $ENGINE ps --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" \
    --format '{{.Names}}' | sort
}
in_container_health() {  # CONTAINER TARGET: the image's own health check, run inside it
  $ENGINE exec "$1" cbir health --timeout 4 "$2" 2>&1 | quiet
  return "${PIPESTATUS[0]}"
}
wait_for() {  # SECONDS DESCRIPTION COMMAND...: retry COMMAND every 3 s until it succeeds
  local limit=$1 what=$2; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - start < limit )) || { "$@" || true; fail "$what: not within $limit s"; }
    sleep 3
  done
  ok "$what ($(( SECONDS - start )) s)"
}

VOLUMES=(weights bundles prometheus grafana)   # docker-compose.yml's named volumes
POD="pod_$PROJECT"   # podman-compose 1.x puts the project's containers in this pod; its `down` leaves it

remove_stack() {  # every container of the project (podman-compose 1.x `down` leaves replicas 2..N), its pod, its network
  compose down -t 5 >/dev/null 2>&1 || true
  local left
  left=$($ENGINE ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [[ -z $left ]] || $ENGINE rm -f -t 5 $left >/dev/null 2>&1 || true
  if [[ $ENGINE == podman ]]; then $ENGINE pod rm -f "$POD" >/dev/null 2>&1 || true; fi
  $ENGINE network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
}

removal_command() {  # what removes a --keep stack for good: containers, pod, network, volumes
  if [[ $ENGINE == podman ]]; then
    # podman-compose 1.x `down -v` stops at replicas 2..N (and so cannot remove the network or the
    # volumes they use) and leaves the pod: remove those by label and by name.
    printf '%s -p %s down -v -t 5; ' "$COMPOSE" "$PROJECT"
    printf 'podman rm -f -t 5 $(podman ps -aq --filter label=com.docker.compose.project=%s); ' "$PROJECT"
    printf 'podman pod rm -f %s; podman network rm -f %s_default; ' "$POD" "$PROJECT"
    printf 'podman volume rm -f'; printf " ${PROJECT}_%s" "${VOLUMES[@]}"; printf '\n'
  else
    printf '%s -p %s down -v --remove-orphans\n' "$COMPOSE" "$PROJECT"
  fi
}

PASSED=0
teardown() {
  local status=$?
  (( PASSED )) || (( status != 0 )) || status=1   # interrupted
  if (( KEEP )); then
    echo "stack left running (--keep); to remove it (containers, pod, network, volumes):"
    echo "  $(removal_command)"
  else
    step "teardown"
    if (( status != 0 )); then
      echo "--- last log lines of each container (status $status) ---"
      for c in $($ENGINE ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}'); do
        echo "--- $c"; $ENGINE logs --tail 15 "$c" 2>&1 | quiet
      done
    fi
    remove_stack
    # Keep the weights volume: the next run reuses the fetched weights.
    for volume in "${VOLUMES[@]}"; do
      [[ $volume == weights ]] || $ENGINE volume rm -f "${PROJECT}_${volume}" >/dev/null 2>&1 || true
    done
    left=$($ENGINE ps -aq --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null || true)
    if [[ $ENGINE == podman ]] && $ENGINE pod exists "$POD" 2>/dev/null; then left+=" pod $POD"; fi
    [[ -z ${left// /} ]] || echo "WARNING: left behind: $left" >&2
    ok "containers, pod, network and volumes removed (kept ${PROJECT}_weights)"
  fi
  rm -rf "$WORK"
  printf '\n%s after %s s\n' "$( ((status == 0)) && echo 'SMOKE PASSED' || echo 'SMOKE FAILED')" "$SECONDS"
}

# ------------------------------------------------------------------------------------ preflight
step "preflight: $ENGINE, $COMPOSE, the host client"
command -v "$ENGINE" >/dev/null || fail "$ENGINE not found (bash ../shared/tools/container-runtime.sh installs podman)"
$COMPOSE version >/dev/null 2>&1 || fail "$COMPOSE not found"
[[ -x $CBIR ]] || fail "$CBIR not found: run ./scripts/test.sh or scripts/venv.sh first (the host client)"
for port in "$CBIR_GATEWAY_PORT" "$CBIR_GATEWAY_METRICS_PORT" "$CBIR_UI_PORT" "$PROMETHEUS_PORT"; do
  $PY -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', $port))" 2>/dev/null \
    || fail "port $port on 127.0.0.1 is taken (set SMOKE_*_PORT)"
done
remove_stack   # leftovers of an interrupted run
trap teardown EXIT
# `podman-compose version` prints its own version, then podman's (the last line): take its own.
compose_version=$($COMPOSE version 2>/dev/null | grep -i -m1 'compose' || true)
ok "$($ENGINE --version), ${compose_version:-$COMPOSE (version unknown)}, project $PROJECT, $EMBEDDERS embedder replicas"

# ------------------------------------------------------------------------------------ images
if (( BUILD )); then
  step "build the images (docker-compose.yml build sections: deploy/Dockerfile, one target per service)"
  # One service per image, one at a time (weights and indexer-build reuse the embedder and indexer
  # images; building them in parallel would install TensorFlow twice on a small machine).
  for service in embedder indexer gateway ui; do
    start=$SECONDS
    compose build "$service" > "$WORK/build-$service.log" 2>&1 || { tail -n 40 "$WORK/build-$service.log"; fail "building $service"; }
    echo "  cbir-$service built in $(( SECONDS - start )) s"
  done
  ok "images built"
fi
if ! $ENGINE image inspect "prom/prometheus:$PROMETHEUS_VERSION" >/dev/null 2>&1 && $ENGINE image inspect prom/prometheus:latest >/dev/null 2>&1; then
  # This machine's stand-in is tagged latest (see container-runtime.sh); the compose file pins a version.
  $ENGINE tag prom/prometheus:latest "prom/prometheus:$PROMETHEUS_VERSION"
fi
printf '%-28s %10s\n' image size
for service in embedder indexer gateway ui; do
  image=cbir-$service:latest
  printf '%-28s %10s\n' "$image" "$($ENGINE image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
  user=$($ENGINE image inspect "$image" --format '{{.Config.User}}')
  [[ $user == 10001* ]] || fail "$image runs as '$user', not the non-root uid 10001"
  $ENGINE run --rm --entrypoint sh "$image" -c 'for c in gcc g++ cc make; do command -v $c && exit 1; done; exit 0' \
    2>&1 | quiet | grep . && fail "$image contains a compiler"
  if [[ $service != embedder ]]; then
    $ENGINE run --rm --entrypoint python "$image" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is not None)" \
      2>/dev/null || fail "$image contains TensorFlow"
  fi
done
healthcheck=$($ENGINE image inspect cbir-embedder:latest --format '{{json .Config.Healthcheck.Test}}' 2>/dev/null || true)
ok "images run as uid 10001, have no compiler; only the embedder has TensorFlow; HEALTHCHECK ${healthcheck:-(not kept by this engine)}"

step "promtool: prometheus.yml, alert rules, alert unit tests"
promtool() { $ENGINE run --rm -v "$PWD/deploy/prometheus:/etc/prometheus:ro" --entrypoint promtool "prom/prometheus:$PROMETHEUS_VERSION" "$@" 2>&1 | quiet; return "${PIPESTATUS[0]}"; }
promtool check config /etc/prometheus/prometheus.yml || fail "promtool check config"
promtool test rules /etc/prometheus/alerts_test.yml || fail "promtool test rules"
ok "promtool: config and rules valid, alert rule tests pass"

if (( PLAIN )); then
  # ---------------------------------------------------------------------------------- plain up
  step "plain: $COMPOSE up -d --scale embedder=$EMBEDDERS (every service but grafana, no staging)"
  compose up -d --scale "embedder=$EMBEDDERS" "${STACK[@]}" indexer-build 2>&1 | quiet | tail -n 3
  wait_for 600 "the UI answers" "$CBIR" health "$UI/"
  wait_for 600 "the gateway reports both upstreams SERVING" $PY deploy/smoke_check.py status --gateway "$GATEWAY" --expect embedder=SERVING indexer=SERVING --wait 1
  $CBIR search --gateway "$GATEWAY" --k 3 demo/photos/skimage-coffee.jpg
  $PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 30 --concurrency 3 --label "searches" --expect-self-hits
  $PY deploy/smoke_check.py prometheus --url "$PROM" --expect-targets "embedder=$EMBEDDERS" indexer=1 gateway=1 ui=1 prometheus=1 --min-searches 30 --wait 120
  PASSED=1
  exit 0
fi

# ------------------------------------------------------------------------------------ weights
step "weights: the one-shot service fetches the VGG-16 weights into the weights volume"
compose run --rm weights > "$WORK/weights.log" 2>&1 || { quiet < "$WORK/weights.log" | tail -n 20; fail "weights"; }
grep -h "weights ready\|weights: using" "$WORK/weights.log" | tail -n 2
ok "weights ready"

# ------------------------------------------------------------------------------------ no bundle
step "start embedder x$EMBEDDERS, indexer (no bundle yet), gateway, ui, prometheus"
compose up -d --no-deps --scale "embedder=$EMBEDDERS" embedder indexer gateway ui prometheus 2>&1 | quiet | tail -n 3
mapfile -t EMB < <(containers embedder)
INDEXER=$(containers indexer | head -n1)
(( ${#EMB[@]} == EMBEDDERS )) || fail "expected $EMBEDDERS embedder containers, found ${#EMB[@]}: ${EMB[*]}"
ok "embedder replicas: ${EMB[*]}; indexer: $INDEXER"
for c in "${EMB[@]}"; do
  wait_for 300 "$c healthy (gRPC health SERVING)" in_container_health "$c" 127.0.0.1:50051
done
wait_for 120 "gateway healthy from the host ($GATEWAY)" "$CBIR" health "$GATEWAY"

step "the indexer without a bundle: not healthy, says why, the gateway reports it"
sleep 3
if in_container_health "$INDEXER" 127.0.0.1:50052 >/dev/null; then fail "the indexer reports healthy without a bundle"; fi
echo "  indexer health check: $(in_container_health "$INDEXER" 127.0.0.1:50052 || true)"
line=$($ENGINE logs "$INDEXER" 2>&1 | grep -i -m1 "bundle" || true)
[[ -n $line ]] || fail "no log line of the indexer mentions the missing bundle"
echo "  indexer log: $line"
$PY deploy/smoke_check.py status --gateway "$GATEWAY" --expect embedder=SERVING indexer=NOT_SERVING --wait 30
if out=$($CBIR search --gateway "$GATEWAY" demo/photos/skimage-coffee.jpg 2>&1); then fail "a search succeeded without a bundle"; fi
echo "  cbir search: $out"
[[ $out == *UNAVAILABLE* ]] || fail "a search without a bundle should answer UNAVAILABLE"
ok "indexer NOT_SERVING with a clear log line; gateway GetStatus shows it; searches answer UNAVAILABLE"

# ------------------------------------------------------------------------------------ bundle
step "indexer-build: index demo/photos through the embedder replicas (one-shot service)"
compose run --rm --no-deps indexer-build > "$WORK/build-index.log" 2>&1 || { quiet < "$WORK/build-index.log" | tail -n 20; fail "indexer-build"; }
grep -h "^built " "$WORK/build-index.log" || { quiet < "$WORK/build-index.log" | tail -n 5; fail "indexer-build printed no result"; }
wait_for 60 "indexer healthy: bundle picked up without a restart" in_container_health "$INDEXER" 127.0.0.1:50052
$PY deploy/smoke_check.py status --gateway "$GATEWAY" --expect embedder=SERVING indexer=SERVING --wait 30

# ------------------------------------------------------------------------------------ searches
step "searches through the gateway from the host, spread over the $EMBEDDERS embedder replicas"
$CBIR search --gateway "$GATEWAY" --k 3 demo/photos/skimage-astronaut.jpg
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --save "$WORK/base.json"
$PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 60 --concurrency 3 --label "60 searches" --expect-self-hits
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --baseline "$WORK/base.json" --expect-each 10

# ------------------------------------------------------------------------------------ replica killed
VICTIM=${EMB[1]}
step "kill embedder replica $VICTIM (SIGKILL) during a search run"
$PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 60 --concurrency 3 --label "60 searches, one replica killed" \
  --kill "$ENGINE kill $VICTIM" --kill-after 3 --allow-code UNAVAILABLE --max-errors 3
step "restart $VICTIM: it answers Embed calls again"
$ENGINE start "$VICTIM" 2>&1 | quiet >/dev/null
wait_for 300 "$VICTIM healthy again" in_container_health "$VICTIM" 127.0.0.1:50051
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --save "$WORK/base2.json"
deadline=$((SECONDS + 90))
until $PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 30 --concurrency 3 --label "30 searches after the restart" >/dev/null \
      && $PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "$VICTIM" --baseline "$WORK/base2.json" --expect-each 1 >/dev/null; do
  (( SECONDS < deadline )) || { $PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --baseline "$WORK/base2.json"; fail "$VICTIM got no Embed call within 90 s of searches after its restart"; }
done
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --baseline "$WORK/base2.json" --expect-each 1

# ------------------------------------------------------------------------------------ scale up
step "scale the running stack: embedder $EMBEDDERS -> $((EMBEDDERS + 1)), indexer 1 -> 2; the gateway finds the new replicas"
# podman-compose 1.x takes one --scale per command (docker compose: --scale embedder=4 --scale indexer=2).
compose up -d --no-deps --scale "embedder=$((EMBEDDERS + 1))" embedder 2>&1 | quiet | tail -n 1
compose up -d --no-deps --scale indexer=2 indexer 2>&1 | quiet | tail -n 1
mapfile -t EMB < <(containers embedder)
mapfile -t IDX < <(containers indexer)
(( ${#EMB[@]} == EMBEDDERS + 1 && ${#IDX[@]} == 2 )) || fail "after scaling: embedders ${EMB[*]}, indexers ${IDX[*]}"
NEW_EMB=${EMB[-1]} NEW_IDX=${IDX[-1]}
wait_for 300 "$NEW_EMB healthy" in_container_health "$NEW_EMB" 127.0.0.1:50051
wait_for 60 "$NEW_IDX healthy (the same bundle, read-only)" in_container_health "$NEW_IDX" 127.0.0.1:50052
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --save "$WORK/base3.json"
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method QueryVector --port 9102 --containers "${IDX[@]}" --save "$WORK/base3i.json"
# The gateway resolves dns:///embedder and dns:///indexer again when the replicas end its connections
# (CBIR_*_MAX_CONNECTION_AGE_S, 30 s here): search until the new replicas get calls, at most 120 s.
deadline=$((SECONDS + 120)) rounds=0
until $PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "$NEW_EMB" --baseline "$WORK/base3.json" --expect-each 1 >/dev/null \
      && $PY deploy/smoke_check.py replicas --engine "$ENGINE" --method QueryVector --port 9102 --containers "$NEW_IDX" --baseline "$WORK/base3i.json" --expect-each 1 >/dev/null; do
  (( SECONDS < deadline )) || fail "the new replicas got no calls within 120 s of searches"
  $PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 15 --concurrency 3 --label "15 searches" --expect-self-hits >/dev/null \
    || fail "searches failed while scaling"
  rounds=$((rounds + 1))
done
ok "the new replicas answer calls after $rounds rounds of 15 searches (all OK, each finding its own photo)"
$PY deploy/smoke_check.py search --gateway "$GATEWAY" --count 48 --concurrency 4 --label "48 searches on the scaled stack" --expect-self-hits
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method Embed --port 9101 --containers "${EMB[@]}" --baseline "$WORK/base3.json" --expect-each 1
$PY deploy/smoke_check.py replicas --engine "$ENGINE" --method QueryVector --port 9102 --containers "${IDX[@]}" --baseline "$WORK/base3i.json" --expect-each 1

# ------------------------------------------------------------------------------------ prometheus
step "Prometheus ($PROM): every target up, search latencies recorded, expressions valid"
$PY deploy/smoke_check.py prometheus --url "$PROM" --expect-targets "embedder=$((EMBEDDERS + 1))" indexer=2 gateway=1 ui=1 prometheus=1 --min-searches 200 --wait 120

# ------------------------------------------------------------------------------------ ui
step "the UI ($UI)"
"$CBIR" health "$UI/"
curl -fsS "$UI/metrics" | grep -q '^# TYPE cbir_ui_searches_total counter' || fail "the UI's /metrics has no cbir_ui_ metrics"
ok "the UI answers; its /metrics is served on the same port"

step "resources in use"
$ENGINE stats --no-stream --format '{{.Name}} {{.MemUsage}} {{.CPUPerc}}' $($ENGINE ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}') 2>&1 | quiet | sort
PASSED=1
