#!/usr/bin/env python3
"""The proof of the chart's RBAC, read from the API server's audit log.

Usage: audit-check.py RENDERED_CHART.yaml JUSTIFIED.yaml AUDIT_LOG [AUDIT_LOG...]

RENDERED_CHART.yaml is `helm template` of the chart; the audit logs are those of the local
cluster (hack/cluster.sh: every request of the livedisk namespace's ServiceAccounts, Metadata
level). For each ServiceAccount the chart creates, it fails when
  * any request of that account was refused by the authorizer (403 "User ... cannot ..."): the
    chart grants too little (a 403 from admission, such as a namespace being deleted, is listed
    but is not an RBAC matter);
  * a granted (apiGroup, resource, verb) or (nonResourceURL, verb) was never used: the chart
    grants too much, unless JUSTIFIED.yaml names it with the reason it stays.
It prints a table per account: requests seen, refused, grants used / granted.
"""
import json
import re
import sys
from collections import defaultdict

import yaml

# The authorizer's refusal; other 403s come from admission (a namespace being terminated).
RBAC_DENIAL = re.compile(r'is forbidden: User "[^"]*" cannot ')


def chart_objects(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def service_accounts(objects):
    """username -> short name, for every ServiceAccount the chart creates."""
    return {
        f"system:serviceaccount:{o['metadata']['namespace']}:{o['metadata']['name']}": o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ServiceAccount"
    }


def grants_by_account(objects, accounts):
    """username -> set of grants; a grant is ("res", group, resource, verb) or ("url", path, verb)."""
    roles = {}
    for o in objects:
        if o["kind"] in ("ClusterRole", "Role"):
            key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            roles[key] = o.get("rules") or []
    grants = defaultdict(set)
    for o in objects:
        if o["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = o["roleRef"]
        namespace = o["metadata"].get("namespace") if ref["kind"] == "Role" else None
        rules = roles.get((ref["kind"], namespace, ref["name"]))
        if rules is None:
            raise SystemExit(f"audit-check: {o['kind']} {o['metadata']['name']} refers to {ref['kind']} "
                             f"{ref['name']}, which the chart does not render")
        for subject in o.get("subjects") or []:
            if subject.get("kind") != "ServiceAccount":
                continue
            user = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
            if user not in accounts:
                continue
            for rule in rules:
                for verb in rule.get("verbs", []):
                    for url in rule.get("nonResourceURLs", []):
                        grants[user].add(("url", url, verb))
                    for group in rule.get("apiGroups", []):
                        for resource in rule.get("resources", []):
                            grants[user].add(("res", group, resource, verb))
    return grants


def request_key(event):
    """The grant an audit event used, in the form of grants_by_account."""
    ref = event.get("objectRef")
    if ref is None:
        path = event.get("requestURI", "").split("?")[0]
        return ("url", path, event.get("verb", ""))
    resource = ref.get("resource", "")
    if ref.get("subresource"):
        resource = f"{resource}/{ref['subresource']}"
    return ("res", ref.get("apiGroup", ""), resource, event.get("verb", ""))


def matches(grant, used):
    if grant[0] != used[0]:
        return False
    return all(g == "*" or g == u for g, u in zip(grant[1:], used[1:]))


def fmt(grant):
    if grant[0] == "url":
        return f"{grant[2]} {grant[1]}"
    group = grant[1] or "core"
    return f"{grant[3]} {grant[2]} ({group})"


def justified_grants(path):
    with open(path) as f:
        entries = yaml.safe_load(f) or []
    out = {}
    for e in entries:
        sa = e["serviceAccount"]
        for verb in e["verbs"]:
            if "nonResourceURL" in e:
                out[(sa, ("url", e["nonResourceURL"], verb))] = e["why"]
            else:
                out[(sa, ("res", e.get("apiGroup", ""), e["resource"], verb))] = e["why"]
    return out


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    objects = chart_objects(argv[1])
    accounts = service_accounts(objects)
    grants = grants_by_account(objects, accounts)
    justified = justified_grants(argv[2])

    seen = defaultdict(int)
    refused = defaultdict(list)
    admission = defaultdict(set)
    counted = set()
    used = defaultdict(set)
    for log in argv[3:]:
        with open(log) as f:
            for line in f:
                event = json.loads(line)
                # A watch is logged when its response starts (and again only when it ends, which
                # may be after the log is read); every other request when it completes.
                if event.get("stage") not in ("ResponseComplete", "ResponseStarted"):
                    continue
                if event["auditID"] in counted:
                    continue
                counted.add(event["auditID"])
                user = event.get("user", {}).get("username", "")
                if user not in accounts:
                    continue
                seen[user] += 1
                key = request_key(event)
                status = event.get("responseStatus", {})
                code = status.get("code")
                message = status.get("message", "")
                if code == 403 and RBAC_DENIAL.search(message):
                    refused[user].append(message)
                elif code == 403:
                    # Allowed by RBAC, refused by admission (e.g. a namespace being deleted).
                    admission[user].add(re.sub(r'"[^"]*"', '"…"', message))
                else:
                    used[user].add(key)
                    # A watch-list (watch with sendInitialEvents=true: how client-go informers
                    # start on this API server) is the informer's list; on API servers without
                    # it they send a plain list. It stands for both verbs.
                    if key[0] == "res" and key[3] == "watch" and "sendInitialEvents=true" in event.get("requestURI", ""):
                        used[user].add(key[:3] + ("list",))
                    # Server-side apply of a missing object creates it: that is the create verb.
                    if key[0] == "res" and key[3] == "patch" and code == 201:
                        used[user].add(key[:3] + ("create",))

    failed = False
    print(f"{'account':<28} {'requests':>9} {'refused':>8} {'grants used':>12}")
    for user, name in sorted(accounts.items(), key=lambda a: a[1]):
        granted = grants.get(user, set())
        unused = sorted(
            (g for g in granted if not any(matches(g, u) for u in used[user])),
            key=fmt,
        )
        unjustified = [g for g in unused if (name, g) not in justified]
        print(f"{name:<28} {seen[user]:>9} {len(refused[user]):>8} "
              f"{len(granted) - len(unused):>5} / {len(granted):<5}")
        for line in sorted(set(refused[user])):
            print(f"    REFUSED by RBAC (403): {line}")
            failed = True
        for line in sorted(admission[user]):
            print(f"    refused by admission, not RBAC (403): {line}")
        for g in unjustified:
            print(f"    UNUSED grant: {fmt(g)}")
            failed = True
        for g in unused:
            if (name, g) in justified:
                print(f"    unused but justified: {fmt(g)}: {justified[(name, g)]}")
    stale = [f"{sa}: {fmt(g)}" for (sa, g) in justified
             if not any(g in grants.get(u, set()) for u, n in accounts.items() if n == sa)]
    for line in stale:
        print(f"    JUSTIFIED but not granted (remove it from the list): {line}")
        failed = True
    if failed:
        print("audit-check: FAILED: the chart's RBAC does not match what its components do "
              "(see REFUSED / UNUSED above)")
        return 1
    print("audit-check: no request of a chart account was refused, and every grant was used "
          "(or is justified)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
