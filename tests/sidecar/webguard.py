"""The `web-guard` policy on destination `web`, enforced by the HTTP sidecar tests
(test_http_sidecar.py) and the mitmproxy addon tests (test_mitm_addon.py). The rules both
suites test alike are here; each suite gives the limits it tests against its own timing and
adds the rules only it tests."""

from __future__ import annotations

import textwrap

WEB_GUARD = """\
apiVersion: sluice/v1
kind: Policy
metadata: {{name: web-guard}}
spec:
  destination: web
  rules:
    - name: no-admin
      http: {{paths: ["/admin/**"]}}
      action: deny
      message: admin is off limits
    - name: no-debug-header
      http: {{headers: {{x-debug: ["1", "true"]}}}}
      action: deny
    - name: post-budget
      http: {{methods: [POST], paths: ["/orders"]}}
      action: limit
      limit: {post_budget}
      message: slow down
    - name: paced
      http: {{methods: [PUT], paths: ["/paced"]}}
      action: limit
      limit: {paced}
      on_exceed: delay
      max_delay: 2s
    - name: shadow-delete
      http: {{methods: [DELETE]}}
      action: deny
      enforce: false
"""


def add_rules(policy: str, rules: str) -> str:
    """`policy` (ending with its list of rules) with `rules` (a YAML list) appended to it."""
    return policy + textwrap.indent(textwrap.dedent(rules), "    ")


def web_guard(*, post_budget: str, paced: str, rules: str = "") -> str:
    """The policy, with the limits of `post-budget` (POST /orders, rejected beyond it) and
    `paced` (PUT /paced, delayed up to 2 s beyond it), and `rules` after the shared ones."""
    return add_rules(WEB_GUARD.format(post_budget=post_budget, paced=paced), rules)
