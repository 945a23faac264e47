"""Check that the carried wheel set installs on the GPU machine's image: pip's resolver, for CPython 3.12, over
the carried wheels plus a stand-in for every package the image already has.

Each preinstalled package becomes a metadata-only stub wheel (no dependencies, no files): at its pinned version
where ``constraints-gpu-image.txt`` names one (torch 2.11, transformers 5.17, huggingface_hub, numpy, ...), else at
version 9999 (present, version unchecked). The resolver then runs offline (``--no-index``) over the stubs and the
carried wheels: a requirement the image lacks and nothing carries, or a carried wheel that wants another version of
a pinned image package, fails the check. ``--no-deps`` wheels (open-clip-torch: only its vocabulary file is read)
are installed without their requirements on the machine and are checked as such.

Usage: python scripts/gpu/check_wheels.py WHEEL_DIR [--no-deps-wheel NAME ...]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def stub_wheel(folder: str, name: str, version: str) -> None:
    """A metadata-only wheel ``name==version`` (what the resolver needs to know the image has it)."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fastinpo-stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text)}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(os.path.join(folder, f"{dist}-{version}-py3-none-any.whl"), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheels", help="folder of the carried wheels")
    p.add_argument("--no-deps-wheel", nargs="*", default=["open-clip-torch"],
                   help="carried wheels installed with --no-deps (their requirements are not resolved)")
    p.add_argument("--python", default=sys.executable, help="the Python whose pip resolves")
    args = p.parse_args(argv)
    pins = {}
    for line in read_list(os.path.join(HERE, "constraints-gpu-image.txt")):
        name, version = line.split("==")
        pins[norm(name)] = version
    image = {norm(n) for n in read_list(os.path.join(HERE, "gpu-image-packages.txt"))} | set(pins)
    wheels = sorted(f for f in os.listdir(args.wheels) if f.endswith(".whl"))
    carried = {norm(f.split("-")[0]): f for f in wheels}
    overlap = sorted(set(carried) & image)
    if overlap:
        print(f"[check] note: carried wheels shadow image packages: {', '.join(overlap)}")
    no_deps = {norm(n) for n in args.no_deps_wheel}
    with tempfile.TemporaryDirectory(prefix="fastinpo-gpu-stubs-") as stubs:
        for name in sorted(image - set(carried)):
            stub_wheel(stubs, name, pins.get(name, "9999"))
        report = os.path.join(stubs, "report.json")
        resolve = [os.path.join(args.wheels, f) for n, f in carried.items() if n not in no_deps]
        cmd = [args.python, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--no-index",
               "--disable-pip-version-check", "--report", report, "--python-version", "3.12",
               "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--implementation", "cp", "--target",
               os.path.join(stubs, "target"), "--find-links", args.wheels, "--find-links", stubs, *resolve]
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))
            print(f"[check] FAIL: the carried wheels do not resolve against the GPU image:\n{err}", file=sys.stderr)
            return 1
        with open(report) as f:
            items = json.load(f)["install"]
    got = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    unused = sorted(set(carried) - set(got) - no_deps)
    pinned = sorted(f"{n}=={v}" for n, v in got.items() if n in pins)
    print(f"[check] ok: {len(carried)} carried wheels resolve for CPython 3.12 with the image's packages "
          f"({len(got) - len(carried) + len(no_deps & set(carried))} of them used; pinned: {', '.join(pinned)})")
    if unused:
        print(f"[check] note: carried but required by nothing resolved: {', '.join(unused)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
