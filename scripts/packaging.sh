#!/usr/bin/env bash
# Checks what packaging/ ships, against a built transportd binary:
#  * the systemd units pass `systemd-analyze verify` (Debian 12: systemd 252), with no
#    warning at all: verify exits 0 on an unparsable value it only warns about, so any
#    output counts as a failure. verify needs each ExecStart= binary to exist, so it runs
#    on copies of the units whose /usr/bin/transportd is the built binary, and it looks up
#    each Documentation=man: page, so MANPATH holds the pages `transportd generate man`
#    writes (the ones a package installs);
#  * the Kubernetes manifests validate against the Kubernetes 1.37 schemas, strictly (no
#    unknown fields), with kubernetes-validate (its schemas ship in the package: after the
#    install nothing is fetched) from a venv of its own;
#  * the configurations in the manifests' ConfigMaps pass `transportd config check`,
#    `issuer check` and `policy check`;
#  * negative controls: a unit with a misspelt value, one whose binary is missing, and a
#    manifest with a misspelt field each fail, so the checks above can fire.
#
#   scripts/packaging.sh [TRANSPORTD_BIN]      default: target/debug/transportd
#   scripts/packaging.sh --venv-only           only make the venv (test.sh, in the background)
#
# Needs systemd (systemd-analyze) and python3-venv; the venv is kept in
# target/kubernetes-validate and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

kubernetes_validate_version=1.37.0
venv=target/kubernetes-validate
make_venv() {
    if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null |
        grep -q "$kubernetes_validate_version"; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "kubernetes-validate==$kubernetes_validate_version"
    fi
}
if [ "${1:-}" = "--venv-only" ]; then
    make_venv
    exit 0
fi
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/debug/transportd}")
[ -x "$bin" ] || { echo "no transportd binary at $bin: build it first" >&2; exit 1; }
make_venv

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
fail() { echo "!! packaging: $*" >&2; exit 1; }

# systemd units.
mkdir -p "$scratch/units" "$scratch/man/man1"
"$bin" generate man "$scratch/man/man1" 2>/dev/null
for unit in packaging/systemd/*.service; do
    sed "s#/usr/bin/transportd#$bin#g" "$unit" >"$scratch/units/$(basename "$unit")"
done
# Verifies the units given; fails on a non-zero exit or on any output.
verify() {
    local out
    if ! out=$(MANPATH="$scratch/man" systemd-analyze verify "$@" 2>&1) || [ -n "$out" ]; then
        echo "$out"
        return 1
    fi
}
verify "$scratch"/units/*.service || fail "systemd-analyze verify failed on packaging/systemd"
echo "packaging: systemd-analyze verify: $(cd packaging/systemd && echo *.service) pass"
mkdir -p "$scratch/broken"
sed 's/^Type=notify/Type=notifyy/' "$scratch/units/transportd-node.service" \
    >"$scratch/broken/transportd-node.service"
if verify "$scratch/broken/transportd-node.service" >/dev/null; then
    fail "negative control: a unit with Type=notifyy passed verify"
fi
sed "s#^ExecStart=$bin#ExecStart=/nonexistent/transportd#" \
    "$scratch/units/transportd-issuer.service" >"$scratch/broken/transportd-issuer.service"
if verify "$scratch/broken/transportd-issuer.service" >/dev/null; then
    fail "negative control: a unit whose binary is missing passed verify"
fi
echo "packaging: negative controls: a misspelt unit and a missing binary are caught"

# Kubernetes manifests.
validate() { "$venv/bin/kubernetes-validate" --strict --quiet "$@"; }
validate packaging/kubernetes/*.yaml || fail "the Kubernetes manifests do not validate"
echo "packaging: kubernetes-validate --strict (Kubernetes 1.37): $(cd packaging/kubernetes && echo *.yaml) pass"
sed 's/^      hostPID: true/      hostPid: true/' packaging/kubernetes/node.yaml >"$scratch/broken.yaml"
grep -q hostPid "$scratch/broken.yaml" || fail "negative control: nothing replaced"
if validate "$scratch/broken.yaml" >/dev/null 2>&1; then
    fail "negative control: a DaemonSet with a misspelt field (hostPid) validated"
fi
echo "packaging: negative control: a misspelt field in a manifest is caught"

# The configurations in the ConfigMaps, as the daemons would read them: the host's
# directories are under this one, the bootstrap bundle a real one.
conf="$scratch/etc"
mkdir -p "$conf/var/datasets" "$conf/run"
"$venv/bin/python" - "$conf" packaging/kubernetes/*.yaml <<'PY'
import sys, yaml
out, files = sys.argv[1], sys.argv[2:]
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        if doc and doc["kind"] == "ConfigMap":
            for name, text in doc["data"].items():
                with open(f"{out}/{name}", "w") as w:
                    for host, here in [("/etc/transportd/", "/"), ("/var/lib/transportd/", "/var/"),
                                       ("/run/transportd/", "/run/")]:
                        text = text.replace(host, out + here)
                    w.write(text)
PY
"$bin" ca init --trust-domain hospital.example --out "$scratch/ca" >/dev/null
cp "$scratch/ca/bundle.pem" "$conf/bootstrap-bundle.pem"
"$bin" config check "$conf/node.toml" >/dev/null || fail "node.toml of node.yaml"
TRANSPORTD_CA_PASSPHRASE=check "$bin" issuer check "$conf/issuer.toml" >/dev/null ||
    fail "issuer.toml of issuer.yaml"
"$bin" policy check "$conf/policy.toml" >/dev/null || fail "policy.toml of node.yaml"
echo "packaging: the ConfigMaps' node.toml, issuer.toml and policy.toml pass their checks"
