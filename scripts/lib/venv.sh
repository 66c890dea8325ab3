# shellcheck shell=bash
# Sourced by scripts/setup, scripts/ssd/fetch_and_convert.sh and scripts/validate-deploy: brings a
# Python environment to the pins of one scripts/requirements/*.txt file (see sync_venv.py there).
# Does nothing, fast and without network, when the installed versions already equal the pins.
#
#   ensure_venv VENV REQUIREMENTS                    a venv, created when missing
#   ensure_target DIR REQUIREMENTS [sync_venv.py options, e.g. --no-deps]
#                                                    a `pip install --target` folder
# Environment: PYTHON (default python3), the interpreter that creates the venv.
# No pip cache: the wheels would take as much disk again (torch with its CUDA wheels is ~3 GB).
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
ATTRSTREAM_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

ensure_venv() {
  "${PYTHON:-python3}" "$ATTRSTREAM_LIB/sync_venv.py" --venv "$1" "$2"
}

ensure_target() {
  local dir=$1 req=$2
  shift 2
  "${PYTHON:-python3}" "$ATTRSTREAM_LIB/sync_venv.py" --target "$dir" "$@" "$req"
}
