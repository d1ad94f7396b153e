#!/usr/bin/env bash
# Every script on a CUDA GPU, then the full-size GPU benchmark, from a bare checkout with no network:
#
#     benchmarks/gpu_check.sh OUT            # tests/test_cuda.py, python -m benchmarks.run --device cuda, eager
#                                            # against --compile (benchmarks.step)
#     benchmarks/gpu_check.sh OUT --quick    # the same with the benchmark's tiny presets (a dry run; also on a CPU)
#
# Uses the Python on the PATH as it is (torch, torchvision, numpy, Pillow, pytest; matplotlib and faiss are
# optional). faiss: an installed one, else a wheel in .whl/ (for example faiss-cpu, carried along as a file) is
# installed into a temporary folder; without either, the DeepCluster family runs with --kmeans-backend torch.
# Writes OUT/pytest.log, OUT/pytest.xml, OUT/benchmark.log, OUT/BENCHMARKS.md and OUT/compile.log; exits non-zero if
# anything failed.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [--quick]}
quick=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ! "$python" -c "import faiss" 2>/dev/null && compgen -G ".whl/faiss*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/faiss*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" - <<'PY' | tee "$out/environment.txt"
import importlib.util, platform, torch, torchvision
print(f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
print("CUDA:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("faiss:", "installed" if importlib.util.find_spec("faiss") else "not installed (torch k-means)")
PY

if "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then device=cuda; else device=cpu; fi
if [ "$device" = cpu ] && [ "$quick" != --quick ]; then
  echo "error: no CUDA GPU here; benchmarks/gpu_check.sh OUT --quick is the dry run" >&2
  exit 2
fi

status=0
"$python" -m pytest -m cuda tests/test_cuda.py -v -p no:cacheprovider --junitxml "$out/pytest.xml" 2>&1 \
  | tee "$out/pytest.log" || status=1
"$python" -m benchmarks.run --device "$device" ${quick:+--quick} --output "$out/BENCHMARKS.md" 2>&1 \
  | tee "$out/benchmark.log" || status=1
# eager against torch.compile (--compile), side by side in one process: step time and the warm-up that compiles
if [ "$quick" = --quick ]; then sizes="--arch resnet18 --size 32 --batches 8 --queue 1024 --steps 1 --reps 1"
else sizes="--arch resnet50 --size 224 --batches 64 --queue 65536 --steps 10 --reps 3"; fi
"$python" -m benchmarks.step moco_v2 moco_v2_compiled deepcluster_v2 deepcluster_v2_compiled --device "$device" \
  $sizes 2>&1 | tee "$out/compile.log" || status=1
exit $status
