#!/usr/bin/env python3
"""Checks that the chart only passes what the livedisk binaries understand.

Usage: chart-flags.py RENDERED_CHART.yaml BIN_DIR

For every container of the rendered chart whose command is `livedisk-csi` or `livedisk-operator`,
each `--flag` in its args must be a flag of that binary (and subcommand), and each environment
variable must be one the binary reads (`[env: NAME=]` in its --help), or RUST_LOG (the log
filter), or a helper variable that another variable or argument of the same container expands
with `$(NAME)` (Kubernetes dependent variables, such as POD_IP). A flag or variable the binary
does not know would be silently ignored (env) or stop the container (flag): both are chart bugs.
"""
import re
import subprocess
import sys

import yaml

ALWAYS_READ = {"RUST_LOG"}


def containers(objects):
    for o in objects:
        spec = (o.get("spec") or {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            yield o, c


def help_text(bin_dir, command, args):
    argv = [f"{bin_dir}/{command[0]}"] + command[1:]
    if command[0] == "livedisk-csi" and args and not args[0].startswith("-"):
        argv.append(args[0])
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"chart-flags: {' '.join(argv)} --help failed: {out.stderr.strip()}")
    return out.stdout


def check(o, c, bin_dir):
    command = c.get("command") or []
    args = [str(a) for a in c.get("args") or []]
    text = help_text(bin_dir, command, args)
    flags = set(re.findall(r"--([a-z0-9-]+)", text))
    env_read = set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))
    where = f"{o['kind']} {o['metadata']['name']}, container {c['name']}"
    problems = []
    for arg in args:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name not in flags:
                problems.append(f"{where}: {command[0]} has no flag --{name}")
    env = c.get("env") or []
    expanded = " ".join(args + [str(e.get("value", "")) for e in env])
    for e in env:
        name = e["name"]
        if name in env_read or name in ALWAYS_READ or f"$({name})" in expanded:
            continue
        problems.append(f"{where}: {command[0]} does not read the environment variable {name}")
    return problems


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        objects = [d for d in yaml.safe_load_all(f) if d]
    problems, checked = [], 0
    for o, c in containers(objects):
        command = c.get("command") or []
        if command and command[0] in ("livedisk-csi", "livedisk-operator"):
            checked += 1
            problems += check(o, c, argv[2])
    for p in problems:
        print(f"  {p}")
    if problems:
        print(f"chart-flags: FAILED: {len(problems)} flag(s)/variable(s) the binaries do not know")
        return 1
    if checked == 0:
        print("chart-flags: FAILED: no livedisk container found in the rendered chart")
        return 1
    print(f"chart-flags: the {checked} livedisk containers pass only flags and variables their binaries read")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
