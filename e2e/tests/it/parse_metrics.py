"""Parses /metrics text with the Python prometheus_client parsers (the e2e metrics test).

Usage: parse_metrics.py prometheus|openmetrics FILE
Prints {family: {"type": ..., "samples": [[name, labels, value], ...]}} as JSON, or exits
non-zero with the parser's error. A family named twice is an error too.
"""
import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families

fmt, path = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as f:
    text = f.read()
parse = openmetrics_families if fmt == "openmetrics" else prometheus_families
out = {}
for family in parse(text):
    if family.name in out:
        sys.exit(f"family {family.name} appears twice")
    out[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
json.dump(out, sys.stdout)
