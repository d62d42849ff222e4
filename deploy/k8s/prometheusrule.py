"""Writes the Prometheus Operator's PrometheusRule (k8s/base/prometheusrule.yaml) from the one
rules file, prometheus/alerts.yml, so the two cannot differ. Run from deploy/:
`python3 k8s/prometheusrule.py > k8s/base/prometheusrule.yaml`; validate.sh checks the
committed file is what this prints."""
import sys

import yaml

def block(dumper, text):
    """Multi-line expressions as literal blocks, as in the rules file."""
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


yaml.SafeDumper.add_representer(str, block)
rules = yaml.safe_load(open("prometheus/alerts.yml"))
doc = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "token-broker", "namespace": "token-broker"},
    "spec": {"groups": rules["groups"]},
}
sys.stdout.write(
    "# Generated from deploy/prometheus/alerts.yml by deploy/k8s/prometheusrule.py: edit the\n"
    "# rules file, then regenerate. For the Prometheus Operator (remove from\n"
    "# kustomization.yaml if it is not installed).\n"
)
yaml.safe_dump(doc, sys.stdout, sort_keys=False, width=1000)
