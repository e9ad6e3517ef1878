#!/usr/bin/env bash
# The GPU checks nfjax still owes, in steps that each fit one 10-minute call of a lent GPU
# machine (the device tool: no package registry there, python3 3.12 with JAX for CUDA 13,
# mpi4py, tifffile, optax; gemmi is missing and travels as a wheel, and so does PyPI's MPICH
# for when mpi4py finds no MPI library there).
#
# Here, once (downloads the gemmi and mpich wheels to .whl/, copies ../shared/data to
# .gpu-data/; .gitignore ignores both, so they travel only when carried; about 25 MB):
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
    local mpich
    mpich=$(grep -i '^mpich==' constraints.txt)
    [ -d .gpu-data ] && chmod -R u+w .gpu-data
    rm -rf .gpu-data .whl && mkdir -p .gpu-data .whl
    cp -r --no-preserve=mode ../shared/data/. .gpu-data/
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "gemmi>=0.6.5" "$mpich" || return 1
    du -sh .whl .gpu-data
}

install_wheel() {   # install_wheel NAME: the carried wheel of NAME into /tmp/site
    local wheel
    wheel=$(ls .whl/"$1"-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || { echo "gpu_check: no $1 wheel in .whl (run prepare, carry .whl)" >&2
                         return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheel" || return 1
    if [ "$1" = mpich ]; then
        # pip --target leaves out the wheel's lib/: libmpi, which mpi4py loads at import
        "$PY" -m zipfile -e "$wheel" /tmp/mpich-wheel && mkdir -p /tmp/site/lib &&
            cp -a /tmp/mpich-wheel/*.data/data/lib/. /tmp/site/lib/ &&
            chmod +x /tmp/site/bin/* || return 1
    fi
}

setup() {
    mkdir -p "$LOGS"
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    if ! "$PY" -c "import gemmi" 2>/dev/null; then install_wheel gemmi || return 1; fi
    if ! "$PY" -c "from mpi4py import MPI" 2>/dev/null; then
        # a missing MPI only skips the MPI steps and tests
        install_wheel mpich && export LD_LIBRARY_PATH="/tmp/site/lib:${LD_LIBRARY_PATH:-}" \
            PATH="/tmp/site/bin:$PATH"
    fi
    # Open MPI's mpiexec refuses root (the device machine runs commands as root)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
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
    timeout 240 "$PY" benchmarks/bench_images.py --frames 400 --log-frames 200 --record ||
        return 1
    # two ranks sharing the GPU split the frames (the MPI image processing)
    if mpiexec_path >/dev/null; then
        timeout 240 "$PY" benchmarks/bench_images.py --frames 400 --log-frames 200 --ranks 2 \
            --record
    fi
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
    timeout 200 "$PY" -m nfjax.cli reconstruct "$dir/one/params.txt" --ff-seeds \
        --no-image-processing || return 1
    timeout 300 "$mpiexec" -n 2 "$PY" -m nfjax.cli reconstruct "$dir/two/params.txt" \
        --ff-seeds --no-image-processing || return 1
    local failed=0
    echo "--- master log, rank lines:"
    grep -h "rank [0-9] on" "$dir"/two/midas_log/*.log | sort -u | grep . || failed=1
    echo "--- files, 2 ranks against 1 process:"
    for f in "$dir"/one/*.mic*; do
        if cmp -s "$f" "$dir/two/$(basename "$f")"; then echo "same  $(basename "$f")"
        else echo "DIFFER $(basename "$f")"; failed=1; fi
    done
    return $failed
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
