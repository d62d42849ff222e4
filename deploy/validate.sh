#!/usr/bin/env bash
# Validates what can be validated without a Docker engine or a cluster: every YAML parses, the
# Grafana dashboard is JSON with panels, the alert rules pass `promtool check rules` and their
# unit tests (`promtool test rules prometheus/alerts_test.yml`), and the Kubernetes manifests
# pass kubernetes-validate's bundled schemas (CRDs are skipped).
# With REQUIRE_TOOLS=1 (as in CI) a missing tool is an error, not a skip.
set -euo pipefail
cd "$(dirname "$0")"

missing() {
  if [ "${REQUIRE_TOOLS:-0}" = 1 ]; then
    echo "validate: $1 is required (REQUIRE_TOOLS=1) but not installed" >&2
    exit 1
  fi
  echo "$1 not installed: $2"
}

python3 - <<'PY'
import glob, json, sys, yaml
for f in sorted(glob.glob("**/*.yml", recursive=True) + glob.glob("**/*.yaml", recursive=True)):
    list(yaml.safe_load_all(open(f)))
    print(f"yaml ok: {f}")
dash = json.load(open("grafana/dashboards/token-broker.json"))
assert dash["panels"], "dashboard has no panels"
variables = {v["name"] for v in dash["templating"]["list"]}
assert {"instance", "tenant"} <= variables, f"dashboard variables: {variables}"
for p in dash["panels"]:
    assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    # Every query follows the replica picker (so one failing replica is not averaged away).
    for t in p["targets"]:
        assert '$instance' in t["expr"], f"{p['title']}: {t['expr']} ignores $instance"
print(f"dashboard ok: {len(dash['panels'])} panels, variables {sorted(variables)}")
rules = yaml.safe_load(open("prometheus/alerts.yml"))
names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
print(f"alert rules: {', '.join(names)}")
PY

# The PrometheusRule is generated from the rules file: one source.
python3 k8s/prometheusrule.py | diff -u k8s/base/prometheusrule.yaml - ||
  { echo "k8s/base/prometheusrule.yaml is stale: run python3 k8s/prometheusrule.py > k8s/base/prometheusrule.yaml in deploy/" >&2; exit 1; }
echo "prometheusrule ok: generated from prometheus/alerts.yml"

if command -v promtool >/dev/null; then
  promtool check rules prometheus/alerts.yml
  promtool test rules prometheus/alerts_test.yml
else
  missing promtool "alert rules checked as YAML only"
fi

if command -v kubernetes-validate >/dev/null; then
  for f in k8s/base/*.yaml k8s/overlays/*/*.yaml; do
    case "$f" in *kustomization.yaml|*servicemonitor.yaml|*prometheusrule.yaml) continue ;; esac
    kubernetes-validate --strict "$f"
  done
  # Each overlay as kustomize renders it (the operator's CRDs, which have no bundled schema,
  # left out), when kubectl is at hand.
  if command -v kubectl >/dev/null; then
    for o in k8s/overlays/*/; do
      rendered=$(mktemp)
      kubectl kustomize "$o" | python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] not in ("ServiceMonitor", "PrometheusRule")]
yaml.safe_dump_all(docs, sys.stdout)' >"$rendered"
      kubernetes-validate --strict --quiet "$rendered"
      echo "overlay ok: $o ($(grep -c '^kind:' "$rendered") resources)"
      rm -f "$rendered"
    done
  fi
else
  missing kubernetes-validate "manifests checked as YAML only"
fi

# Security policy checks on the manifests as files and as kustomize renders them.
if command -v checkov >/dev/null; then
  for d in k8s/base k8s/overlays/*/; do
    checkov -d "$d" --framework kubernetes,kustomize --compact --quiet --skip-download
  done
else
  missing checkov "manifests not checked against security policies"
fi
