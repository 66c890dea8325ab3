#!/usr/bin/env python3
"""Brings a Python environment to the pins of one requirements file (scripts/requirements/*.txt).

Usage:
  sync_venv.py --venv DIR REQUIREMENTS            a virtual environment (created when missing)
  sync_venv.py --target DIR [--no-deps] [--check-file REL] REQUIREMENTS
                                                  a folder for pip's --target option (.libtorch)

Compares what is installed (the distributions' metadata, names normalized as in PEP 503) with
the `name==version` pins of REQUIREMENTS. When everything matches it returns at once, without
network. When a pin is missing or another version is installed it says what differs on stderr
("opencv-python-headless 5.1.0.95 -> 5.0.0.93") and installs with pip
(`--require-hashes -r REQUIREMENTS`), then checks again. A --target folder is rebuilt
beside it (DIR.partial) and swapped in. Packages installed beyond the pins are reported and left
alone (a --cuda .libtorch holds more than the CPU pins; a developer may add tools to .venv).

Runs with the python that creates the environment (setup's $PYTHON, default python3); that
interpreter also evaluates the pins' environment markers.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

# pip run as a module, and its install command with every package hashed in the file
# (`cmd.insert(4, ...)` adds an option right after "install").
PIP = ["-m", "pip"]
INSTALL_PINNED = ["install", "--require-hashes"]
ME = "sync-venv"
# A venv brings these itself; they are only compared when the requirements file pins them.
BOOTSTRAP = {"pip", "setuptools", "wheel", "distribute"}


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_applies(marker):
    """Evaluates a PEP 508 environment marker with packaging (or pip's copy of it)."""
    try:
        from packaging.markers import Marker
    except ImportError:
        try:
            from pip._vendor.packaging.markers import Marker
        except ImportError:
            return True  # unknown: count the pin, pip decides when installing
    return Marker(marker).evaluate()


def read_pins(path):
    """{normalized name: (name, version)} of the `name[extras]==version` lines (hash options and
    continuation lines allowed, as pip-compile and uv write them)."""
    pins = {}
    with open(path) as fh:
        logical = fh.read().replace("\\\n", " ")
    for lineno, line in enumerate(logical.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line or line.startswith("-"):
            continue
        line = re.sub(r"\s--hash=\S+", "", line).strip()
        req, _, marker = line.partition(";")
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*===?\s*([^\s,;]+)", req.strip())
        if not m:
            sys.exit(f"{ME}: {path}: `{line}` is not pinned as name==version")
        if marker.strip() and not marker_applies(marker.strip()):
            continue
        pins[normalize(m.group(1))] = (m.group(1), m.group(3))
    return pins


def installed_in(paths):
    from importlib import metadata

    found = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), (name, dist.version))
    return found


def same_version(a, b):
    if a == b:
        return True
    try:
        from packaging.version import Version
    except ImportError:
        try:
            from pip._vendor.packaging.version import Version
        except ImportError:
            return False
    try:
        return Version(a) == Version(b)
    except Exception:
        return False


def differences(pins, installed):
    diffs = []
    for key, (name, version) in sorted(pins.items()):
        have = installed.get(key)
        if have is None:
            diffs.append(f"{name} (missing) -> {version}")
        elif not same_version(have[1], version):
            diffs.append(f"{name} {have[1]} -> {version}")
    return diffs


def venv_site_dirs(venv):
    """The venv's site-packages folders, asked of its own interpreter (None when it is broken)."""
    py = os.path.join(venv, "bin", "python")
    if not os.access(py, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [py, "-c", "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(set(out.split()))


def run(cmd):
    print(f"{ME}: {' '.join(cmd)}", file=sys.stderr)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        sys.exit(f"{ME}: pip failed (exit {rc})")


def pip_env():
    env = dict(os.environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.setdefault("PIP_ROOT_USER_ACTION", "ignore")
    return env


def report(label, diffs):
    """One line per version that differs; missing packages together (all of them in a new venv)."""
    missing = [d.split(" ", 1)[0] for d in diffs if " (missing) -> " in d]
    changed = [d for d in diffs if " (missing) -> " not in d]
    print(f"{ME}: bringing {label} to the pins of its requirements file:", file=sys.stderr)
    for d in changed:
        print(f"{ME}:   {d}", file=sys.stderr)
    if missing:
        names = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        print(f"{ME}:   missing: {names}", file=sys.stderr)


def report_extras(label, installed, pins):
    extras = sorted(f"{n} {v}" for k, (n, v) in installed.items() if k not in pins and k not in BOOTSTRAP)
    if extras:
        print(f"{ME}: note: {label} also holds packages that are not pinned (left as they are): "
              + ", ".join(extras), file=sys.stderr)


def sync_venv(venv, req, pins, quiet):
    sites = venv_site_dirs(venv)
    if sites is None:
        if os.path.exists(venv):
            print(f"{ME}: {venv} is not a working venv; creating it anew", file=sys.stderr)
            shutil.rmtree(venv)
        print(f"{ME}: creating {venv} from {req}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        with open(os.path.join(venv, ".gitignore"), "w") as fh:
            fh.write("*\n")  # keeps git from listing the venv (python >= 3.13 does this itself)
        sites = venv_site_dirs(venv)
        if sites is None:
            sys.exit(f"{ME}: {venv}/bin/python does not run after `python -m venv`")
    installed = installed_in(sites)
    diffs = differences(pins, installed)
    if not diffs:
        return False
    report(venv, diffs)
    cmd = [os.path.join(venv, "bin", "python"), *PIP, *INSTALL_PINNED, "-r", req]
    if quiet:
        cmd.insert(4, "--quiet")
    os.environ.update(pip_env())
    run(cmd)
    installed = installed_in(sites)
    left = differences(pins, installed)
    if left:
        sys.exit(f"{ME}: {venv} still differs from {req} after installing: " + "; ".join(left))
    report_extras(venv, installed, pins)
    return True


def sync_target(target, req, pins, no_deps, check_files, quiet):
    installed = installed_in([target]) if os.path.isdir(target) else {}
    diffs = differences(pins, installed)
    missing_files = [f for f in check_files if not os.path.exists(os.path.join(target, f))]
    if not diffs and not missing_files:
        return False
    report(target, diffs + [f"{f} is missing" for f in missing_files])
    partial = target.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, *PIP, *INSTALL_PINNED, "--target", partial, "-r", req]
    if no_deps:
        cmd.insert(4, "--no-deps")
    if quiet:
        cmd.insert(4, "--quiet")
    os.environ.update(pip_env())
    try:
        run(cmd)
        left = differences(pins, installed_in([partial]))
        if left:
            sys.exit(f"{ME}: {partial} differs from {req} after installing: " + "; ".join(left))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # the old folder stays as it was
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--venv", help="virtual environment folder")
    where.add_argument("--target", help="pip --target folder")
    ap.add_argument("--no-deps", action="store_true", help="(--target) pip install --no-deps")
    ap.add_argument("--check-file", action="append", default=[],
                    help="(--target) a file, relative to the folder, that must exist")
    ap.add_argument("--verbose", action="store_true", help="show pip's output")
    ap.add_argument("requirements")
    args = ap.parse_args()

    pins = read_pins(args.requirements)
    if not pins:
        sys.exit(f"{ME}: {args.requirements} pins nothing")
    if args.venv:
        changed = sync_venv(args.venv, args.requirements, pins, not args.verbose)
    else:
        changed = sync_target(args.target, args.requirements, pins, args.no_deps, args.check_file,
                              not args.verbose)
    if changed:
        print(f"{ME}: {args.venv or args.target} now matches {args.requirements}", file=sys.stderr)


if __name__ == "__main__":
    main()
