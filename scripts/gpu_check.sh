#!/usr/bin/env bash
# The GPU checks nfjax still owes, in steps that each fit one 10-minute call of a lent GPU
# machine (the device tool: no package registry there, python3 3.12 with JAX for CUDA 13,
# mpi4py, tifffile, optax; gemmi is missing and travels as a wheel).
#
# Here, once (downloads the gemmi wheel to .whl/, copies ../shared/data to .gpu-data/;
# .gitignore ignores both, so they travel only when carried):
#     scripts/gpu_check.sh prepare
# There, with carry [".whl", ".gpu-data"], one or more steps per call:
#     scripts/gpu_check.sh env tests
#     scripts/gpu_check.sh images fit
#     scripts/gpu_check.sh reconstruct mpi
# Steps:
#   env          GPU, JAX, devices, MPI: what the rest relies on
#   tests        the default test suite (not slow) with JAX on the GPU
#   images       bench_images: frames/s of 2048^2 (target >= 10 on an H100)
#   fit          bench_fit: seeded Au fit, screening pairs/s (target >= 1e8 on an H100)
#   reconstruct  bench_reconstruct: Au end to end (MIDAS C: 27-30 s on 2 CPU threads)
#   mpi          2 ranks sharing the one GPU: the device plan in the master log, and the
#                files compared with one process
# Each step's output goes to $OUT/gpu_check/STEP.log; benchmarks/RESULTS.md (with the
# benchmarks' new sections) is copied to $OUT/RESULTS.md: merge what they appended.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/nfjax-gpu-check}
LOGS="$OUT/gpu_check"

prepare() {
    rm -rf .gpu-data && mkdir -p .gpu-data .whl
    cp -r ../shared/data/. .gpu-data/
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "gemmi>=0.6.5" || return 1
    du -sh .whl .gpu-data
}

setup() {
    mkdir -p "$LOGS"
    if ! "$PY" -c "import gemmi" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
    [ -d .gpu-data ] && export NFJAX_SHARED_DATA="$PWD/.gpu-data"
    export NFJAX_PROGRESS=0
    return 0
}

mpiexec_path() {
    local here
    here="$(dirname "$(command -v "$PY")")/mpiexec"
    if [ -x "$here" ]; then echo "$here"; else command -v mpiexec; fi
}

step_env() {
    nvidia-smi -L || echo "nvidia-smi: no GPU listed"
    "$PY" - <<'EOF'
import sys, jax
print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
import nfjax, gemmi, tifffile, optax
print("nfjax", nfjax.__version__, "gemmi", gemmi.__version__, "tifffile", tifffile.__version__)
try:
    from mpi4py import MPI
    print("mpi4py", MPI.Get_library_version().splitlines()[0])
except Exception as exc:
    print("mpi4py: not usable:", exc)
EOF
    echo "mpiexec: $(mpiexec_path || echo none)"
}

step_tests() {
    # several pytest workers share the GPU: no preallocation of 75 % each
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 540 "$PY" -m pytest -q -p no:cacheprovider \
        -n 4 -m "not slow" tests
}

step_images() {
    timeout 540 "$PY" benchmarks/bench_images.py --frames 400 --log-frames 200 --record
}

step_fit() {
    timeout 540 "$PY" benchmarks/bench_fit.py --orientations 243129 --record
}

step_reconstruct() {
    timeout 540 "$PY" benchmarks/bench_reconstruct.py --record
}

step_mpi() {
    local mpiexec dir
    mpiexec=$(mpiexec_path) || { echo "no mpiexec: step skipped"; return 1; }
    dir=$(mktemp -d)
    "$PY" - "$dir" <<'EOF' || return 1
# The Au example, a 40 x 40 um window, observations simulated from the ground truth.
import shutil, sys
from pathlib import Path
from nfjax.cli import main
from nfjax.data import au_example
from nfjax.params import update_param_text
d = Path(sys.argv[1]); ex = au_example()
for k in ("one", "two"):
    (d / k).mkdir()
    text = update_param_text(ex["params"].read_text(), {
        "OutputDirectory": str(d / k), "DataDirectory": str(d / k), "GrainsFile": "grs.csv",
        "SeedOrientations": "seeds.csv", "GridMask": (-20.0, 20.0, -20.0, 20.0)})
    (d / k / "params.txt").write_text(text)
    shutil.copy(ex["grains"], d / k / "grs.csv")
    assert main(["simulate", str(d / k / "params.txt"), str(ex["mic"]), "-o",
                 str(d / k / "SpotsInfo.bin")]) == 0
EOF
    "$PY" -m nfjax.cli reconstruct "$dir/one/params.txt" --ff-seeds --no-image-processing \
        || return 1
    timeout 480 "$mpiexec" -n 2 "$PY" -m nfjax.cli reconstruct "$dir/two/params.txt" \
        --ff-seeds --no-image-processing || return 1
    echo "--- master log, rank lines:"
    grep -h "rank [0-9] on" "$dir"/two/midas_log/*.log | sort -u
    echo "--- files, 2 ranks against 1 process:"
    for f in "$dir"/one/*.mic*; do
        if cmp -s "$f" "$dir/two/$(basename "$f")"; then echo "same  $(basename "$f")"
        else echo "DIFFER $(basename "$f")"; fi
    done
}

if [ $# -eq 0 ]; then sed -n '2,25p' "$0"; exit 2; fi
status=0
for step in "$@"; do
    case "$step" in
        prepare) prepare || status=1; continue ;;
        env|tests|images|fit|reconstruct|mpi) ;;
        *) echo "gpu_check: unknown step $step (env tests images fit reconstruct mpi prepare)" >&2
           exit 2 ;;
    esac
    setup || { echo "gpu_check: setup failed" >&2; exit 1; }
    start=$(date +%s)
    "step_$step" > "$LOGS/$step.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    echo "== $step: exit $rc in $(( $(date +%s) - start )) s; last lines of $LOGS/$step.log:"
    tail -n 15 "$LOGS/$step.log"
done
[ -d "$LOGS" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
exit $status
