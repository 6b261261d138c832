"""Filters a multi-document YAML stream (stdin) down to the objects of the kinds named as
arguments, and writes them (stdout) as one YAML stream. Used to apply only parts of a rendered
chart (for example its ServiceAccounts and RBAC)."""
import sys

import yaml


def main() -> int:
    kinds = set(sys.argv[1:])
    if not kinds:
        print("usage: select-kinds.py KIND...", file=sys.stderr)
        return 2
    selected = [d for d in yaml.safe_load_all(sys.stdin) if d and d.get("kind") in kinds]
    yaml.safe_dump_all(selected, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
