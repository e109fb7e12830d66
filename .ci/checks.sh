#!/usr/bin/env bash
# Every check CI runs, in order; exits non-zero on the first failure. Expects the venv on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff"
ruff check python tests benchmarks kernels

echo "== build info"
python -c "import sparseflow, json; print(json.dumps(sparseflow.info(), indent=1))"

echo "== fast test suite (CPU kernels run once per ISA level this CPU has, see tests/conftest.py)"
python -m pytest -q

echo "== kernel tests with SPARSEFLOW_ISA forced, one process per ISA level"
for isa in $(python -c "import sparseflow; print(' '.join(sparseflow.available_isas()))"); do
  SPARSEFLOW_ISA=$isa python -m pytest -q tests/test_kernels.py -k "test_linear_matches_reference and 129" -p no:randomly
done

echo "== AVX-512 bf16 kernels without BF16 dot products (the path CPUs without AVX512_BF16 take)"
SPARSEFLOW_NO_BF16_DOT=1 python -m pytest -q tests/test_kernels.py -k "bfloat16"

echo "== kernels on sparseflow's own thread pool (the path when torch's OpenMP runtime is not shared)"
SPARSEFLOW_OWN_POOL=1 python -m pytest -q tests/test_kernels.py tests/test_decompress.py -k "129 or thread"

if [ -f tests/test_triton_kernels.py ]; then
  echo "== Triton kernels under TRITON_INTERPRET=1"
  TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_kernels.py
fi

if ! command -v nvcc >/dev/null 2>&1; then
  echo "notice: nvcc not on PATH: the CUDA compile check (tests/test_cuda.py::test_nvcc_compiles) was skipped"
fi
echo "== all checks passed"
