#!/usr/bin/env bash
# End-to-end test of the CPU image on a real multi-node Ray cluster made of Docker containers.
#
#   bash infra/test_cluster.sh
#
# 1. base image: reused when present; else, for the default local tag, made with debootstrap
#    from the Debian mirror this host's apt uses (no registry image is pulled);
# 2. CPU image: infra/docker/Dockerfile.cpu built on that base (layer cache makes a rebuild
#    of unchanged sources take seconds), with this host's pip index settings;
# 3. input: synthetic photographs (`fundus-batch synth`, run in the image) in a host folder
#    bind-mounted at the same path into every container: the cluster's shared storage;
# 4. cluster: one Ray head (0 CPUs: it holds the job driver) and two 1-CPU workers on a
#    Docker network; the head's dashboard port is published on 127.0.0.1 only;
# 5. jobs/regenerate_pairs.py submitted from the host through the Ray Jobs API; one worker
#    container is killed (`docker kill`) once the first outputs exist; the job is waited for
#    (it may finish or fail); the same job is submitted again and must succeed;
# 6. `fundus-batch verify OUT --manifest M` on the host: exit 0 only when every (image,
#    variant) is present exactly once and every file matches its checksum.
# Containers, network and the work folder are removed on exit. Every wait has a deadline.
#
# Environment (all optional):
#   FB_BASE_IMAGE   base image (default fundus-base:bookworm, made locally when missing)
#   FB_IMAGE        CPU image tag (default fundus-batch:<version>-cpu-local)
#   FB_VENV         host virtual environment with ray and fundus-batch (default .venv)
#   FB_IMAGES, FB_SIZE, FB_VARIANTS   workload (default 150 images, 256 px, 2 variants)
#   FB_BUILD_TIMEOUT  seconds for the image build (default 1800)
#   FB_KEEP=1       keep the work folder (containers are removed regardless)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

VENV=${FB_VENV:-$REPO/.venv}
HOST_RAY=$VENV/bin/ray
HOST_FB=$VENV/bin/fundus-batch
HOST_PY=$VENV/bin/python
VERSION=$("$HOST_PY" -c "import fundus_batch; print(fundus_batch.__version__)")
BASE_IMAGE=${FB_BASE_IMAGE:-fundus-base:bookworm}
IMAGE=${FB_IMAGE:-fundus-batch:$VERSION-cpu-local}
N_IMAGES=${FB_IMAGES:-150}
SIZE=${FB_SIZE:-256}
VARIANTS=${FB_VARIANTS:-2}
BUILD_TIMEOUT=${FB_BUILD_TIMEOUT:-1800}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' infra/docker/Dockerfile.cpu)
# A stable port keeps the build arguments, and so the layer cache, identical between runs.
WHEELS_PORT=${FB_WHEELS_PORT:-38765}
NAME=fb-cluster-$$
NET=$NAME-net
HEAD=$NAME-head
WORKERS=("$NAME-worker1" "$NAME-worker2")
export RAY_AUTH_MODE=disabled

WORK=$(mktemp -d /tmp/fb-cluster.XXXXXX)
chmod 0755 "$WORK"
DATA=$WORK/data
OUT=$DATA/out
WHEELS_PID=""
T0=$SECONDS
T_PHASE=$SECONDS

log() { printf '[test_cluster %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
phase_done() {
  log "phase '$1' took $((SECONDS - T_PHASE)) s"
  TIMINGS+=("$(printf '%-28s %5d s' "$1" "$((SECONDS - T_PHASE))")")
  T_PHASE=$SECONDS
}
die() { log "FAIL: $*"; exit 1; }
TIMINGS=()

cleanup() {
  local rc=$?
  set +e
  if [[ $rc -ne 0 && -n "$(docker ps -aq -f name="^$HEAD$" 2>/dev/null)" ]]; then
    log "head container log (tail):"
    docker logs --tail 30 "$HEAD" 2>&1 | sed 's/^/    /'
  fi
  docker rm -f "$HEAD" "${WORKERS[@]}" "$NAME-synth" >/dev/null 2>&1
  docker network rm "$NET" >/dev/null 2>&1
  [[ -n "$WHEELS_PID" ]] && kill "$WHEELS_PID" 2>/dev/null
  if [[ "${FB_KEEP:-0}" == 1 ]]; then log "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  log "total $((SECONDS - T0)) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls COMMAND every second until it succeeds; fails after TIMEOUT seconds.
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 1
  done
}

[[ -x "$HOST_RAY" && -x "$HOST_FB" ]] || die "no ray/fundus-batch in $VENV (create the venv first)"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"

# ---------------------------------------------------------------------------------------------
# 1. Base image
debian_mirror() {
  # The first Debian archive URI this host's apt uses (deb822 or one-line format).
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}')
  [[ -z "$uri" ]] && uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}')
  echo "${uri:-http://deb.debian.org/debian}"
}

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE present, reused"
elif [[ "$BASE_IMAGE" == fundus-base:* ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  MIRROR=$(debian_mirror)
  log "making $BASE_IMAGE with debootstrap from $MIRROR"
  ROOTFS=$WORK/rootfs
  timeout 900 nice -n 10 debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  IMPORT_ARGS=(-c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    -c 'CMD ["/bin/bash"]')
  HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  if [[ -f "$HOST_CA" ]]; then
    # The host's trust store (TLS may be intercepted on the way to the package index). Kept
    # beside Debian's bundle, which installing ca-certificates in the image would overwrite.
    install -D -m 0644 "$HOST_CA" "$ROOTFS/etc/ssl/host-ca-bundle.crt"
    IMPORT_ARGS+=(-c 'ENV PIP_CERT=/etc/ssl/host-ca-bundle.crt')
  fi
  tar -C "$ROOTFS" -c . | docker import "${IMPORT_ARGS[@]}" - "$BASE_IMAGE" >/dev/null
  rm -rf "$ROOTFS"
else
  timeout 600 docker pull "$BASE_IMAGE" || die "cannot pull $BASE_IMAGE"
fi
phase_done "base image"

# ---------------------------------------------------------------------------------------------
# 2. CPU image, with this host's pip settings
pip_setting() { "$HOST_PY" -m pip config get "global.$1" 2>/dev/null || true; }
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
INDEX_URL=${PIP_INDEX_URL:-$(pip_setting index-url)}
[[ -n "$INDEX_URL" ]] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$INDEX_URL")
# A CPU torch wheel among this host's find-links folders is served to the build over HTTP on
# the Docker bridge, so that the image gets the very wheel the host installs.
TORCH_WHEEL=""
for dir in ${PIP_FIND_LINKS:-} $(pip_setting find-links); do
  dir=${dir#file://}
  [[ -d "$dir" ]] || continue
  TORCH_WHEEL=$(find "$dir" -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-cp311-*.whl" | head -1)
  [[ -n "$TORCH_WHEEL" ]] && break
done
if [[ -n "$TORCH_WHEEL" ]]; then
  BRIDGE_IP=$(docker network inspect bridge -f '{{(index .IPAM.Config 0).Gateway}}')
  if [[ -z "$BRIDGE_IP" ]]; then  # not always recorded: Docker gives the bridge the first address
    BRIDGE_IP=$("$HOST_PY" -c "import ipaddress, sys; print(next(ipaddress.ip_network(sys.argv[1]).hosts()))" \
      "$(docker network inspect bridge -f '{{(index .IPAM.Config 0).Subnet}}')")
  fi
  mkdir -p "$WORK/wheels"
  ln -s "$TORCH_WHEEL" "$WORK/wheels/"
  "$HOST_PY" -m http.server "$WHEELS_PORT" --bind "$BRIDGE_IP" --directory "$WORK/wheels" \
    >"$WORK/wheels.log" 2>&1 &
  WHEELS_PID=$!
  wait_for 20 "the wheel server" curl -sf "http://$BRIDGE_IP:$WHEELS_PORT/"
  log "serving $(basename "$TORCH_WHEEL") to the build at http://$BRIDGE_IP:$WHEELS_PORT/"
  BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=http://$BRIDGE_IP:$WHEELS_PORT/"
    --build-arg "PIP_TRUSTED_HOST=$BRIDGE_IP"
    --build-arg "TORCH_INDEX_URL=${INDEX_URL:-https://pypi.org/simple}")
fi
log "building $IMAGE on $BASE_IMAGE"
# The classic builder: BuildKit needs the buildx plugin, which Debian's docker.io lacks.
if ! DOCKER_BUILDKIT=0 timeout "$BUILD_TIMEOUT" nice -n 10 docker build --force-rm \
  -f infra/docker/Dockerfile.cpu "${BUILD_ARGS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  die "docker build failed"
fi
[[ -n "$WHEELS_PID" ]] && { kill "$WHEELS_PID" 2>/dev/null; WHEELS_PID=""; }
log "image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
phase_done "CPU image build"

# ---------------------------------------------------------------------------------------------
# 3. Input on the shared folder (same path on the host and in every container)
mkdir -p "$DATA"
chown 1000:100 "$DATA"
RUN_AS=(docker run --rm --user 1000:100 -v "$WORK:$WORK" -e RAY_AUTH_MODE=disabled)
timeout 300 "${RUN_AS[@]}" --name "$NAME-synth" "$IMAGE" \
  fundus-batch synth "$DATA/photos" --count "$N_IMAGES" --size "$SIZE" --seed 3 >/dev/null
{
  echo "image_id,uri,mask_uri"
  for photo in "$DATA"/photos/synth_?????.png; do
    id=$(basename "$photo" .png)
    echo "$id,$photo,$DATA/photos/${id}_mask.png"
  done
} >"$DATA/manifest.csv"
ROWS=$(($(wc -l <"$DATA/manifest.csv") - 1))
[[ $ROWS -eq $N_IMAGES ]] || die "manifest has $ROWS rows, expected $N_IMAGES"
cat >"$DATA/cluster.yaml" <<EOF
manifest: $DATA/manifest.csv
out: $OUT
mode: pairs
seed: 11
size: $SIZE
variants: $VARIANTS
types: all
shard_rows: 8
progress: false
ray:
  rows_per_block: 2
  fetch_threads: 2
EOF
# Where the package has an output lease, the rerun may wait out the lease of a killed driver.
if "${RUN_AS[@]}" "$IMAGE" python -c "from fundus_batch.config import LeaseOptions" 2>/dev/null; then
  printf 'lease:\n  wait: 120\n' >>"$DATA/cluster.yaml"
fi
log "input: $ROWS synthetic photographs, $((ROWS * VARIANTS)) (image, variant) pairs expected"
phase_done "input (synth in the image)"

# ---------------------------------------------------------------------------------------------
# 4. Cluster
docker network create "$NET" >/dev/null
NODE=(docker run -d --network "$NET" --shm-size=512m --memory=3g --user 1000:100
  -v "$WORK:$WORK" -e RAY_AUTH_MODE=disabled -e RAY_USAGE_STATS_ENABLED=0)
"${NODE[@]}" --name "$HEAD" --hostname head --network-alias head -p 127.0.0.1::8265 "$IMAGE" \
  ray start --head --port=6379 --dashboard-host=0.0.0.0 --dashboard-port=8265 --num-cpus=0 \
  --object-store-memory=200000000 --block >/dev/null
for worker in "${WORKERS[@]}"; do
  "${NODE[@]}" --name "$worker" --hostname "$worker" "$IMAGE" \
    ray start --address=head:6379 --num-cpus=1 --object-store-memory=200000000 --block >/dev/null
done
DASHBOARD=http://$(docker port "$HEAD" 8265/tcp | head -1)
alive_nodes() {
  docker exec "$HEAD" python -c \
    "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" \
    2>/dev/null | tail -1
}
cluster_ready() { [[ "$(alive_nodes)" == 3 ]] && curl -sf "$DASHBOARD/api/version"; }
wait_for 180 "3 alive Ray nodes and the dashboard" cluster_ready
log "cluster up: head + ${#WORKERS[@]} workers, Jobs API at $DASHBOARD"
phase_done "cluster start"

# ---------------------------------------------------------------------------------------------
# 5. Jobs: submit, kill a worker mid-run, wait, resubmit
ENTRYPOINT=(python /home/ray/app/jobs/regenerate_pairs.py --config "$DATA/cluster.yaml")
submit() {
  "$HOST_RAY" job submit --address "$DASHBOARD" --submission-id "$1" --no-wait \
    -- "${ENTRYPOINT[@]}" >/dev/null
}
job_state() {
  "$HOST_PY" -c "import sys; from ray.job_submission import JobSubmissionClient as C; \
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)" "$DASHBOARD" "$1" 2>/dev/null | tail -1
}
wait_job() {  # prints the final state
  local id=$1 timeout=$2 state=""
  local deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    state=$(job_state "$id")
    case "$state" in SUCCEEDED | FAILED | STOPPED) echo "$state"; return 0 ;; esac
    sleep 2
  done
  log "job $id still ${state:-unknown} after ${timeout}s: stopping it" >&2
  "$HOST_RAY" job stop --address "$DASHBOARD" "$id" >/dev/null 2>&1 || true
  echo "TIMEOUT"
}
degraded_files() { find "$OUT/images" -name 'v*.png' 2>/dev/null | wc -l; }

JOB1=$NAME-run1
submit "$JOB1"
log "submitted $JOB1"
# As soon as the first images exist: the rest of the run (a few seconds per 100 pairs once the
# actors are up) must still be ahead.
DEADLINE=$((SECONDS + 300))
until (($(degraded_files) >= 1)); do
  ((SECONDS < DEADLINE)) || die "timed out after 300s waiting for the first images of $JOB1"
  sleep 0.2
done
docker kill "${WORKERS[1]}" >/dev/null
AT_KILL=$(degraded_files)
log "killed ${WORKERS[1]} with $AT_KILL of $((ROWS * VARIANTS)) degraded images written"
((AT_KILL < ROWS * VARIANTS)) || die "$JOB1 had written everything before the kill (use more FB_IMAGES)"
phase_done "run 1 until the kill"
STATE1=$(wait_job "$JOB1" 600)
log "$JOB1 ended: $STATE1 ($(degraded_files) degraded images on disk)"
"$HOST_RAY" job logs --address "$DASHBOARD" "$JOB1" 2>/dev/null | tail -3 | sed 's/^/    /'
phase_done "run 1 after the kill"

JOB2=$NAME-run2
submit "$JOB2"
log "resubmitted the same job as $JOB2 (one worker left)"
STATE2=$(wait_job "$JOB2" 600)
"$HOST_RAY" job logs --address "$DASHBOARD" "$JOB2" 2>/dev/null | tail -3 | sed 's/^/    /'
[[ "$STATE2" == SUCCEEDED ]] || die "$JOB2 ended $STATE2"
phase_done "run 2 (resubmitted)"

# ---------------------------------------------------------------------------------------------
# 6. Exactly once
log "verify on the host: $HOST_FB verify $OUT --manifest $DATA/manifest.csv"
if ! timeout 300 nice -n 10 "$HOST_FB" verify "$OUT" --manifest "$DATA/manifest.csv"; then
  die "verify found problems"
fi
phase_done "verify"
log "timings:"
printf '    %s\n' "${TIMINGS[@]}"
log "PASS: $ROWS images x $VARIANTS variants, worker killed mid-run (run 1: $STATE1), rerun succeeded, verify OK"
