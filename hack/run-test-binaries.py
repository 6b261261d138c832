#!/usr/bin/env python3
"""Runs the workspace's test binaries in lanes side by side, where `cargo test` runs them one
after another: the binaries of the packages named by --cluster-package (the tests against a
local cluster, which kill its node plugins and daemons and cut its links: one at a time on each
cluster) in one lane per cluster, every other binary (engines and daemons of their own in
temporary directories, unit tests) in another. Most of the cluster tests' time is spent waiting
on real parts (a merge throttled to a rate, a daemon restarted), so the lanes cost each other
little.

    cargo test ... --no-run --message-format=json | hack/run-test-binaries.py \
        --cluster-package livedisk-e2e --durations FILE [--seed FILE] [--log-dir DIR] \
        [--cluster-env FILE]...

The first cluster lane runs its binaries with this process's environment (its cluster's
LIVEDISK_STATE_DIR, KUBECONFIG, ...); each --cluster-env FILE (KEY=VALUE lines: another
cluster's) adds a lane whose binaries run with those variables on top. The cluster lanes take
their binaries from one queue.

Reads cargo's JSON messages on stdin and runs every test executable in its package's directory
(as cargo does). Each binary's whole output is printed, unmixed, when it ends, after a line that
says which one it was and how long it took; a line every minute says which are still running.
Within a lane the longest binaries go first (durations from FILE, kept from the last run, or the
committed --seed). Exit status: 0 if every binary passed, 101 (cargo's) otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def package_name(package_id, package_dir):
    """A package's name from cargo's package ID: "path+file:///…/dir#name@version", or
    "path+file:///…/dir#version" when the name is the directory's, or (older cargo)
    "name version (source)"."""
    if "#" not in package_id:
        return package_id.split(" ")[0]
    fragment = package_id.rsplit("#", 1)[1]
    if "@" in fragment:
        return fragment.split("@")[0]
    return os.path.basename(package_dir)


def test_binaries(messages):
    """(name, executable, package dir, package name) of every test executable in cargo's JSON
    messages."""
    found = []
    for line in messages:
        line = line.strip()
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        target = msg["target"]
        package = os.path.dirname(msg["manifest_path"])
        kind = target["kind"][0]
        name = f"{os.path.basename(package)}/{target['name']}" + ("" if kind == "test" else f" ({kind})")
        found.append((name, msg["executable"], package, package_name(msg["package_id"], package)))
    return found


def read_env(path):
    """KEY=VALUE lines of `path` (blank lines and # comments skipped)."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, _, value = line.partition("=")
            env[key.strip()] = value
    return env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster-package", action="append", default=[])
    ap.add_argument("--durations", required=True)
    ap.add_argument("--seed", default=None)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--cluster-env", action="append", default=[])
    args = ap.parse_args()
    cluster_envs = [dict(os.environ)] + [dict(os.environ, **read_env(p)) for p in args.cluster_env]
    binaries = test_binaries(sys.stdin)
    if not binaries:
        print("run-test-binaries: no test executables in cargo's output", file=sys.stderr)
        return 2
    last = {}
    for path in (args.seed, args.durations):
        try:
            with open(path) as f:
                last.update(json.load(f))
        except (TypeError, OSError, ValueError):
            pass
    # Unknown ones first (they may be long), then the longest.
    binaries.sort(key=lambda b: -last.get(b[0], float("inf")))
    cluster_queue = [b for b in binaries if b[3] in args.cluster_package]
    other_queue = [b for b in binaries if b[3] not in args.cluster_package]
    queues = [cluster_queue, other_queue]
    # (queue, environment, lane label) per worker.
    lanes = [(cluster_queue, env, f"cluster {i + 1}" if len(cluster_envs) > 1 else None)
             for i, env in enumerate(cluster_envs)]
    lanes.append((other_queue, dict(os.environ), None))
    lock = threading.Lock()
    running = {}
    durations = dict(last)
    failed = []
    t0 = time.monotonic()

    def stamp():
        return f"[{time.monotonic() - t0:.0f}s]"

    def worker(queue, env, label):
        on = f" (on {label})" if label else ""
        while True:
            with lock:
                if not queue:
                    return
                name, exe, package, _ = queue.pop(0)
                running[name] = time.monotonic()
                print(f"=== tests {stamp()} {name}: started{on}", flush=True)
            start = time.monotonic()
            proc = subprocess.run(
                [exe], cwd=package, stdin=subprocess.DEVNULL, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            took = time.monotonic() - start
            out = proc.stdout.decode(errors="replace")
            with lock:
                del running[name]
                durations[name] = round(took, 1)
                verdict = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                if proc.returncode != 0:
                    failed.append(name)
                print(f"=== tests {stamp()} {name}: {verdict} in {took:.0f}s{on}", flush=True)
                print(f"     Running {name} ({exe})", flush=True)
                sys.stdout.write(out)
                sys.stdout.flush()
                if args.log_dir:
                    os.makedirs(args.log_dir, exist_ok=True)
                    with open(os.path.join(args.log_dir, name.replace("/", "--").replace(" ", "") + ".log"), "w") as f:
                        f.write(out)

    threads = [threading.Thread(target=worker, args=lane, daemon=True) for lane in lanes]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=60)
            if t.is_alive():
                break
        with lock:
            if running:
                now = time.monotonic()
                still = ", ".join(f"{n} ({now - s:.0f}s)" for n, s in running.items())
                waiting = sum(len(q) for q in queues)
                print(f"=== tests {stamp()} running: {still}; {waiting} waiting", flush=True)
    try:
        with open(args.durations, "w") as f:
            json.dump(durations, f, indent=1, sort_keys=True)
    except OSError as e:
        print(f"run-test-binaries: could not keep the durations: {e}", file=sys.stderr)
    print(f"=== tests {stamp()} {len(binaries)} test binaries, {len(failed)} failed"
          + (": " + ", ".join(failed) if failed else ""), flush=True)
    return 101 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
