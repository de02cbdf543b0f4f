# Sourced by scripts/test and scripts/bench: what both need on a fresh machine.
# As root on Debian, the system packages the tests and benchmarks drive (a real registry,
# skopeo, Redis, the container clients, nginx, wrk, a forward proxy, htpasswd) are installed with apt-get; the package
# itself goes into .venv with its test dependencies.

system_packages=(docker-registry skopeo redis-server nginx wrk curl containerd runc podman docker.io uidmap tinyproxy apache2-utils chromium chromium-driver systemd)

install_system_packages() {
    local missing=() binary
    for binary in docker-registry skopeo redis-server nginx wrk curl containerd runc podman dockerd newuidmap tinyproxy htpasswd chromium chromedriver systemd-analyze; do
        command -v "$binary" >/dev/null 2>&1 || missing+=("$binary")
    done
    install_promtool
    # kubectl (for `kubectl kustomize`): Debian's kubernetes-client where none is installed.
    command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${system_packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${system_packages[@]}" >/dev/null
        command -v kubectl >/dev/null 2>&1 ||
            apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
    else
        echo "not installed: ${missing[*]} (tests that need them will skip; CI=true fails them)"
    fi
}

# promtool (alert rules) comes in Debian's prometheus package, whose server would start as
# a service: only the package's files are unpacked, under /opt, and promtool linked.
install_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        local work
        work=$(mktemp -d)
        (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1 || {
            apt-get update -qq && apt-get download -qq prometheus; })
        dpkg -x "$work"/prometheus_*.deb /opt/promtool-pkg
        ln -sf /opt/promtool-pkg/usr/bin/promtool /usr/local/bin/promtool
        rm -rf "$work"
    else
        echo "not installed: promtool (the alert-rule tests will skip; CI=true fails them)"
    fi
}

make_venv() {
    local python="${PYTHON:-python3}"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
}

# What only the benchmarks need: valgrind counts instructions per request (bench.instructions).
install_bench_packages() {
    command -v valgrind >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends valgrind >/dev/null
    else
        echo "not installed: valgrind (bench/run.py needs it)"
    fi
}
