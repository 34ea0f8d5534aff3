#!/usr/bin/env bash
# Fledge's Kubernetes mode end to end on a real cluster: kind + Istio + Prometheus + the Fledge
# Wasm filter on the ingress gateway + the controller from manifests/.
#
# NOT runnable on this project's build/CI machines: they have no container runtime, no
# Kubernetes API server and no network beyond package registries. There, the same behaviour is
# tested through kube-rs against an in-process fake API server (cargo test -p fledge-controller).
# Run this on a workstation with docker, kind, kubectl, curl and a Rust toolchain:
#
#     make e2e-kind                 # or: bash scripts/e2e-kind.sh
#
# Environment:
#   ISTIO_VERSION  Istio release to install (default 1.27.1)
#   CLUSTER        kind cluster name (default fledge)
#   KEEP=1         keep the cluster afterwards (default: delete it, also on failure)
#   TIMEOUT        seconds to wait for each rollout to finish (default 600)
#
# What it checks:
#   1. a healthy v2 is promoted step by step (VirtualService weights 10 → 25 → 50 → 100, status,
#      Events, testers route while it runs);
#   2. after the GitOps step that makes v2 the stable subset, a v3 answering 20% 5xx is rolled
#      back to 100% stable;
#   3. deleting a Canary mid-rollout returns all traffic to stable (finalizer).
set -euo pipefail

ISTIO_VERSION="${ISTIO_VERSION:-1.27.1}"
CLUSTER="${CLUSTER:-fledge}"
KEEP="${KEEP:-0}"
TIMEOUT="${TIMEOUT:-600}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$REPO_ROOT/.kind-cache"
NS=shop
GATEWAY_URL="http://127.0.0.1:8080/"
LOAD_PID=""

say() { printf '\n== e2e-kind: %s\n' "$*"; }
die() { printf 'e2e-kind: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local status=$?
    stop_load
    if [[ $status -ne 0 ]]; then
        say "diagnostics"
        kubectl -n "$NS" get canary -o wide 2>/dev/null || true
        kubectl -n "$NS" get virtualservice app -o yaml 2>/dev/null | sed -n '/^spec:/,$p' || true
        kubectl -n fledge-system logs deployment/fledge-controller --tail=80 2>/dev/null || true
    fi
    if [[ "$KEEP" != 1 ]]; then
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    else
        say "cluster $CLUSTER kept (kind delete cluster --name $CLUSTER)"
    fi
    exit $status
}

need() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool not found on PATH (this script needs docker, kind, kubectl, curl, cargo)"
    done
}

# Bounded load through the gateway on the loopback port kind maps: ~20 requests/s until
# stopped or for at most TIMEOUT*3 seconds. Half the requests carry no tester header.
start_load() {
    stop_load
    (
        end=$((SECONDS + TIMEOUT * 3))
        while ((SECONDS < end)); do
            curl -s -o /dev/null --max-time 2 "$GATEWAY_URL" || true
            sleep 0.05
        done
    ) &
    LOAD_PID=$!
}

stop_load() {
    if [[ -n "$LOAD_PID" ]]; then
        kill "$LOAD_PID" 2>/dev/null || true
        wait "$LOAD_PID" 2>/dev/null || true
        LOAD_PID=""
    fi
}

canary_field() { kubectl -n "$NS" get canary app -o "jsonpath={$1}" 2>/dev/null || true; }

vs_weights() {
    kubectl -n "$NS" get virtualservice app \
        -o 'jsonpath={range .spec.http[?(@.name=="primary")].route[*]}{.destination.subset}={.weight} {end}'
}

wait_for_phase() {
    local want="$1" deadline=$((SECONDS + TIMEOUT)) phase=""
    while ((SECONDS < deadline)); do
        phase="$(canary_field .status.phase)"
        printf '  phase=%-12s weight=%-3s %s\n' "$phase" "$(canary_field .status.canaryWeight)" "$(canary_field .status.message)"
        [[ "$phase" == "$want" ]] && return 0
        if [[ "$want" != RolledBack && "$phase" == RolledBack ]]; then die "rolled back while waiting for $want"; fi
        sleep 10
    done
    die "Canary app did not reach $want within ${TIMEOUT}s (phase: $phase)"
}

expect_weights() {
    local want="$1" got
    got="$(vs_weights)"
    [[ "$got" == "$want" ]] || die "VirtualService weights are '$got', expected '$want'"
    printf '  VirtualService route primary: %s\n' "$got"
}

expect_event() {
    kubectl -n "$NS" get events --field-selector "involvedObject.name=app,reason=$1" -o name | grep -q . \
        || die "no $1 Event on Canary app"
    printf '  Event %s present\n' "$1"
}

need docker kind kubectl curl cargo
trap cleanup EXIT
cd "$REPO_ROOT"
mkdir -p "$CACHE"

say "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config scripts/kind/cluster.yaml --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

say "Istio $ISTIO_VERSION"
ISTIO_DIR="$CACHE/istio-$ISTIO_VERSION"
if [[ ! -x "$ISTIO_DIR/bin/istioctl" ]]; then
    (cd "$CACHE" && curl -sL https://istio.io/downloadIstio | ISTIO_VERSION="$ISTIO_VERSION" sh -)
fi
"$ISTIO_DIR/bin/istioctl" install -y -f scripts/kind/istio.yaml
kubectl apply -f "$ISTIO_DIR/samples/addons/prometheus.yaml"
kubectl -n istio-system rollout status deployment/prometheus --timeout=300s

say "images (fledge + fledge-testbackend)"
DOCKER_BUILDKIT=1 docker build -f scripts/kind/Dockerfile -t fledge:dev .
kind load docker-image fledge:dev --name "$CLUSTER"

say "Fledge filter on the ingress gateway"
if command -v rustup >/dev/null; then rustup target add wasm32-wasip1 >/dev/null; fi
cargo build -p fledge-filter --target wasm32-wasip1 --release
kubectl -n istio-system create configmap fledge-filter-wasm \
    --from-file=fledge_filter.wasm=target/wasm32-wasip1/release/fledge_filter.wasm \
    --dry-run=client -o yaml | kubectl apply -f -
kubectl -n istio-system patch deployment istio-ingressgateway --type merge \
    --patch-file manifests/filter/gateway-patch.yaml
kubectl apply -f manifests/filter/wasmplugin-file.yaml
kubectl -n istio-system rollout status deployment/istio-ingressgateway --timeout=300s

say "Fledge controller (manifests/)"
kubectl apply -k manifests/
kubectl wait --for condition=established crd/canaries.fledge.dev --timeout=60s
kubectl -n fledge-system rollout status deployment/fledge-controller --timeout=300s

say "example app v1 + v2, Istio routing, Canary"
kubectl apply -f manifests/examples/app.yaml
kubectl apply -f manifests/examples/istio.yaml
kubectl -n "$NS" rollout status deployment/app-v1 --timeout=300s
kubectl -n "$NS" rollout status deployment/app-v2 --timeout=300s
expect_weights "stable=100 canary=0 "
start_load
kubectl apply -f manifests/examples/canary.yaml

say "1. healthy v2 is promoted"
wait_for_phase Progressing
kubectl -n "$NS" get virtualservice app -o jsonpath='{.spec.http[*].name}' | grep -q primary-canary-testers \
    || die "no testers route while the rollout runs"
curl -s -H 'stage: canary' "$GATEWAY_URL" | grep -q v2 || die "a tester did not reach v2"
wait_for_phase Promoted
expect_weights "stable=0 canary=100 "
expect_event CanaryAdvanced
expect_event Promoted
kubectl -n "$NS" get canary app -o wide

say "the leader's dashboard API and /metrics show the promotion"
leader=$(kubectl -n fledge-system get lease fledge-controller -o jsonpath='{.spec.holderIdentity}')
kubectl -n fledge-system port-forward "pod/$leader" 18080:8080 >/dev/null 2>&1 &
forward=$!
sleep 3
curl -sf "http://127.0.0.1:18080/api/v1/canaries/$NS%2Fapp" | grep -q '"phase":"Promoted"' \
    || { kill "$forward"; die "the dashboard API does not show $NS/app Promoted"; }
curl -sf http://127.0.0.1:18080/metrics | grep -q "fledge_canary_weight{canary=\"$NS/app\"} 100" \
    || { kill "$forward"; die "/metrics does not show the promoted weight"; }
kill "$forward"

say "GitOps step: v2 becomes stable, v3 (20% errors) becomes the canary"
kubectl -n "$NS" patch destinationrule app --type json -p \
    '[{"op":"replace","path":"/spec/subsets/0/labels/version","value":"v2"},{"op":"replace","path":"/spec/subsets/1/labels/version","value":"v3"}]'
kubectl -n "$NS" patch virtualservice app --type json -p \
    '[{"op":"replace","path":"/spec/http/0/route/0/weight","value":100},{"op":"replace","path":"/spec/http/0/route/1/weight","value":0}]'
kubectl apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: app-v3, namespace: $NS}
spec:
  replicas: 2
  selector:
    matchLabels: {app: app, version: v3}
  template:
    metadata:
      labels: {app: app, version: v3}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
        - name: app
          image: fledge:dev
          imagePullPolicy: IfNotPresent
          command: [fledge-testbackend, --listen=0.0.0.0:8080, --version=v3, --error-rate=0.2]
          ports: [{containerPort: 8080}]
EOF
kubectl -n "$NS" rollout status deployment/app-v3 --timeout=300s
sleep 15
expect_weights "stable=100 canary=0 "
kubectl -n "$NS" annotate canary app fledge.dev/rollout=v3 --overwrite

say "2. failing v3 is rolled back"
wait_for_phase RolledBack
expect_weights "stable=100 canary=0 "
expect_event RollbackTriggered

say "3. deleting a Canary mid-rollout returns traffic to stable"
kubectl -n "$NS" scale deployment app-v3 --replicas=0
kubectl -n "$NS" patch destinationrule app --type json -p \
    '[{"op":"replace","path":"/spec/subsets/1/labels/version","value":"v2"}]'
kubectl -n "$NS" annotate canary app fledge.dev/rollout=v2-again --overwrite
wait_for_phase Progressing
kubectl -n "$NS" delete canary app --timeout=120s
expect_weights "stable=100 canary=0 "
if kubectl -n "$NS" get virtualservice app -o jsonpath='{.spec.http[*].name}' | grep -q testers; then
    die "the testers route was left behind"
fi

stop_load
say "PASSED"
