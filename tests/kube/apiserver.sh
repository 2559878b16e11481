#!/usr/bin/env bash
# Runs a real etcd + kube-apiserver v1.20.2 on loopback, for tests and developers.
#
#   tests/kube/apiserver.sh start DIR   # certificates, etcd, kube-apiserver; waits for /readyz
#   tests/kube/apiserver.sh stop DIR    # ends the two processes it started (by PID)
#   tests/kube/apiserver.sh kill-apiserver DIR   # SIGKILLs kube-apiserver only (an outage)
#   tests/kube/apiserver.sh start-apiserver DIR  # starts it again on the same port, same etcd
#   export KUBECONFIG=DIR/kubeconfig    # admin (system:masters) client certificate
#
# DIR holds everything (certificates, etcd data, logs, pids, kubeconfig). Ports are picked
# free on 127.0.0.1 (override with ETCD_PORT / APISERVER_PORT). The binary comes from
# tests/kube/build-apiserver.sh (cached; built on first use). etcd is Debian's etcd-server.
set -euo pipefail
usage="usage: apiserver.sh start|stop|kill-apiserver|start-apiserver DIR"
cmd=${1:?$usage}
dir=${2:?$usage}
here=$(cd "$(dirname "$0")" && pwd)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Ends one of the processes this script started, by the PID it recorded.
kill_one() {
  if [ -f "$dir/$1.pid" ]; then kill -9 "$(cat "$dir/$1.pid")" 2>/dev/null || true; rm -f "$dir/$1.pid"; fi
}
stop() { kill_one apiserver; kill_one etcd; }

start_apiserver() {
  "$bin" --etcd-servers="http://127.0.0.1:$(cat etcd.port)" --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 --secure-port="$(cat apiserver.port)" --insecure-port=0 \
    --tls-cert-file=server.crt --tls-private-key-file=server.key --client-ca-file=ca.crt \
    --authorization-mode=Node,RBAC --service-account-key-file=sa.pub \
    --service-account-signing-key-file=sa.key \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.96.0.0/24 --endpoint-reconciler-type=none \
    ${APISERVER_EXTRA_FLAGS:-} >>apiserver.log 2>&1 &
  echo $! >apiserver.pid
}

wait_ready() {
  local api_port; api_port=$(cat apiserver.port)
  for _ in $(seq 1 120); do
    if curl -sf --cacert ca.crt --cert admin.crt --key admin.key "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      echo "kube-apiserver ready on https://127.0.0.1:$api_port (KUBECONFIG=$dir/kubeconfig)"
      return 0
    fi
    kill -0 "$(cat apiserver.pid)" 2>/dev/null || { tail -20 apiserver.log >&2; stop; exit 1; }
    sleep 0.5
  done
  echo "kube-apiserver not ready after 60 s; see $dir/apiserver.log" >&2
  stop; exit 1
}

case $cmd in
stop) stop; exit 0 ;;
kill-apiserver) kill_one apiserver; exit 0 ;;
start-apiserver)
  bin=$("$here/build-apiserver.sh"); cd "$dir"
  kill_one apiserver; start_apiserver; wait_ready; exit 0 ;;
start) ;;
*) echo "unknown command $cmd; $usage" >&2; exit 2 ;;
esac

command -v etcd >/dev/null || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo;
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends etcd-server openssl >/dev/null; }
bin=$("$here/build-apiserver.sh")
mkdir -p "$dir"; dir=$(cd "$dir" && pwd); cd "$dir"

if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=raven-test-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout server.key -out server.csr 2>/dev/null
  # X.509 v3 with key usages: rustls (the hub's client) refuses v1 certificates.
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >server.ext
  printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' >client.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key -out admin.csr 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out admin.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
fi

stop
etcd_port=${ETCD_PORT:-$(free_port)}
peer_port=$(free_port)
api_port=${APISERVER_PORT:-$(free_port)}
etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" >etcd.log 2>&1 &
echo $! >etcd.pid
echo "$etcd_port" >etcd.port; echo "$api_port" >apiserver.port
start_apiserver

cat >kubeconfig <<KC
apiVersion: v1
kind: Config
clusters:
- name: raven-test
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$dir/admin.crt", client-key: "$dir/admin.key"}
contexts:
- name: raven-test
  context: {cluster: raven-test, user: admin}
current-context: raven-test
KC

wait_ready
