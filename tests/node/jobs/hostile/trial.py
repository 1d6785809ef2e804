"""A trial that misbehaves on purpose, one way per ``--mode``, and reports what happened.

* ``read_key``: try to read every node's identity key under ``--cluster`` (the
  local cluster's root); reports ``read_key`` = keys read and ``saw_key`` = keys
  whose file it could even see.
* ``write_outside``: try to create a file in ``--outside`` (a host directory) and in
  each node's home; reports ``wrote_outside`` and ``wrote_home``, the files it could
  create. In the sandbox a node home's path may exist all the same, in the trial's
  private /tmp, where bubblewrap made the mount point of its work directory: a file
  created there never reaches the host, so only the host can tell it was contained.
* ``sleep``: sleep a minute (past any sane trial timeout).
* ``flood``: print without end.
* ``flood_then_metric``: print 1 MB of log, then a metric, then exit.
"""

import argparse
import json
import os
import sys
import time

NODES = ["bootstrap", *(f"provider-{i}" for i in range(1, 9))]


def read_key(cluster: str) -> None:
    saw = read = 0
    for node in NODES:
        path = os.path.join(cluster, node, "identity.pem")
        saw += os.path.exists(path)
        try:
            with open(path, "rb") as f:
                read += bool(f.read())
        except OSError:
            pass
    print(json.dumps({"read_key": read, "saw_key": saw}), flush=True)


def created(path: str) -> bool:
    try:
        with open(path, "x") as f:
            f.write("out of the sandbox\n")
    except OSError:
        return False
    return True


def write_outside(outside: str, cluster: str) -> None:
    homes = sum(created(os.path.join(cluster, node, "escaped")) for node in NODES)
    host = created(os.path.join(outside, "escaped"))
    print(json.dumps({"wrote_outside": int(host), "wrote_home": homes}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--cluster", default="/nonexistent")
    parser.add_argument("--outside", default="/nonexistent")
    args = parser.parse_args()
    if args.mode == "read_key":
        read_key(args.cluster)
    elif args.mode == "write_outside":
        write_outside(args.outside, args.cluster)
    elif args.mode == "sleep":
        time.sleep(60)
        print(json.dumps({"slept": 60}), flush=True)
    elif args.mode == "flood":
        line = "x" * 1023 + "\n"
        while True:
            sys.stdout.write(line)
    elif args.mode == "flood_then_metric":
        line = "y" * 1023 + "\n"
        sys.stdout.write(line * 1024)
        print(json.dumps({"flooded": 1 << 20}), flush=True)


if __name__ == "__main__":
    main()
