# Sourced (not run) by the scripts that test another build of the extension: build_copy LABEL
# [VAR=value ...] copies the working tree (the files git tracks or would track, as they are now)
# into a temporary folder, builds its CPU kernels there with the given environment, and points
# PYTHONPATH at the copy, leaving the normal in-tree build alone. Sets WORK (the copy; removed at
# exit unless KEEP=1). check_copy_imported (once the environment the tests run in is set) fails
# unless Python imports the copy. Environment: PYTHON (default python), MAX_JOBS (default 2).
build_copy() {
    local label=$1
    shift
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    PYTHON=${PYTHON:-python}
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/alphaquant-$label.XXXXXX")
    if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
    echo "$label copy: $WORK"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -f "$f" || -L "$f" ]] && printf '%s\0' "$f"; done |
        tar --null -T - -cf - | tar -xf - -C "$WORK")
    cd "$WORK"
    echo "building ($label: ${*:-default flags}, CPU kernels only)..."
    if ! env "$@" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" ALPHAQUANT_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
            "$PYTHON" setup.py build_ext --inplace >build.log 2>&1; then
        tail -n 40 build.log
        echo "$label build failed (log: $WORK/build.log)" >&2
        exit 1
    fi
    export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
}

check_copy_imported() {
    # The copy, not an installed alphaquant, must be what the tests import.
    "$PYTHON" -c "import alphaquant, sys; sys.exit(not alphaquant.__file__.startswith('$WORK'))" || {
        echo "the tests would not import the copy in $WORK" >&2
        exit 1
    }
}
