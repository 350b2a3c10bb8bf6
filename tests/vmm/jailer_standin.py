"""A stand-in for Firecracker's jailer: takes the jailer's arguments, makes the chroot, execs.

It checks the arguments the jailer requires (docs/jailer.md upstream: --id of
1-64 letters, digits and '-', an exec file named like firecracker), creates
`<chroot-base-dir>/<exec-file name>/<id>/root`, and execs the exec file with
the arguments after `--` in that directory, with $STANDIN_CHROOT telling the
stand-in VMM to resolve absolute paths under it (it does not chroot or drop
privileges). The arguments are written to $STANDIN_JAILER_RECORD as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("jailer: the exec file's arguments must follow --", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, passed = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="jailer")
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-file", required=True)
    parser.add_argument("--uid", required=True, type=int)
    parser.add_argument("--gid", required=True, type=int)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--netns")
    parser.add_argument("--cgroup-version", choices=["1", "2"], default="1")
    parser.add_argument("--daemonize", action="store_true")
    args = parser.parse_args(own)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        print(f"jailer: invalid id {args.id!r}", file=sys.stderr)
        return 2
    exec_file = Path(args.exec_file)
    if "firecracker" not in exec_file.name:
        print("jailer: the exec file's name must contain 'firecracker'", file=sys.stderr)
        return 2
    if not os.access(exec_file, os.X_OK):
        print(f"jailer: exec file {exec_file} is not executable", file=sys.stderr)
        return 2
    root = Path(args.chroot_base_dir) / exec_file.name / args.id / "root"
    root.mkdir(parents=True, exist_ok=False)
    record = os.environ.get("STANDIN_JAILER_RECORD")
    if record:
        Path(record).write_text(json.dumps({"argv": argv, "root": str(root)}))
    os.chdir(root)
    os.environ["STANDIN_CHROOT"] = str(root)
    os.execv(exec_file, [str(exec_file), *passed])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
