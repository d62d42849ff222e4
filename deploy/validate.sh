#!/usr/bin/env bash
# Validates what can be validated without a Docker engine or a cluster: every YAML parses, the
# Grafana dashboard is JSON with panels, the alert rules pass promtool (when installed), and the
# Kubernetes manifests pass kubernetes-validate's bundled schemas (CRDs are skipped).
set -euo pipefail
cd "$(dirname "$0")"

python3 - <<'PY'
import glob, json, sys, yaml
for f in sorted(glob.glob("**/*.yml", recursive=True) + glob.glob("**/*.yaml", recursive=True)):
    list(yaml.safe_load_all(open(f)))
    print(f"yaml ok: {f}")
dash = json.load(open("grafana/dashboards/token-broker.json"))
assert dash["panels"], "dashboard has no panels"
for p in dash["panels"]:
    assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
print(f"dashboard ok: {len(dash['panels'])} panels")
rules = yaml.safe_load(open("prometheus/alerts.yml"))
names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
print(f"alert rules: {', '.join(names)}")
PY

if command -v promtool >/dev/null; then
  promtool check rules prometheus/alerts.yml
else
  echo "promtool not installed: alert rules checked as YAML only"
fi

if command -v kubernetes-validate >/dev/null; then
  for f in k8s/base/*.yaml; do
    case "$f" in *kustomization.yaml|*servicemonitor.yaml) continue ;; esac
    kubernetes-validate --strict "$f"
  done
else
  echo "kubernetes-validate not installed: manifests checked as YAML only"
fi
