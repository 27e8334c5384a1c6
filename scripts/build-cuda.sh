#!/usr/bin/env bash
# Builds `lsplit` with the `cuda` feature (`lsplit serve --device cuda[:N]`) on a machine without
# a GPU or a CUDA toolkit, for a GPU machine without Rust or internet.
#
#   scripts/build-cuda.sh [OUT_DIR]      (default: dist/lsplit-cuda)
#
# - nvcc, the CUDA headers and the libraries to link against come from PyPI (NVIDIA's
#   `cuda-toolkit` wheels, pinned to CUDA 13.0: the GPU machine's nvcc 13.0 and driver 580; PTX
#   newer than the driver's CUDA would not load) into a virtual environment.
# - The driver library (libcuda.so.1) is not on PyPI: the link uses a stub made here from the
#   driver functions cudarc declares; at run time the GPU machine's driver provides the real one.
# - candle's kernels are compiled to PTX for compute capability $CUDA_COMPUTE_CAP (default 90,
#   the H100/H200; the driver JIT-compiles PTX for newer GPUs too), its static quantized-matmul
#   kernels to SASS for the same.
# - The binary goes to target/cuda (apart from the CPU build's target/), stripped, into OUT_DIR
#   with run.sh, which finds cuBLAS, cuRAND, NVRTC and the CUDA runtime (major version 13) on
#   the GPU machine (a CUDA 13 toolkit, or PyTorch's `nvidia` wheels) and runs the binary.
#
# Environment: LSPLIT_CUDA_VENV (default ~/.cache/lambda-split/cuda-13.0), CUDA_COMPUTE_CAP.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist/lsplit-cuda}
venv=${LSPLIT_CUDA_VENV:-$HOME/.cache/lambda-split/cuda-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# 1. The toolkit from PyPI. `cuda-toolkit` 13.0.2 pins each component to CUDA 13.0, except
#    nvvm (cicc, used by nvcc), pinned here to nvcc's own release.
if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,crt,cccl]==13.0.2" "nvidia-nvvm==13.0.88"
cu=$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc under $cu" >&2; exit 1; }

# 2. The link directory: unversioned names for the wheels' libraries, and the driver's stub.
link=$venv/link
mkdir -p "$link"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sf "$cu/lib/$lib" "$link/${lib%.so.*}.so"
done
driver_sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19.*/src/driver/sys/mod.rs' | head -n 1)
if [ -z "$driver_sys" ]; then
    (cd "$root" && cargo fetch --quiet)
    driver_sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19.*/src/driver/sys/mod.rs' | head -n 1)
fi
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$driver_sys" | sed 's/^pub unsafe fn //' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$link/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"

# 3. The build, in its own target directory.
export CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
export PATH=$cu/bin:$PATH NVCC=$cu/bin/nvcc
export LIBRARY_PATH=$link${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link"
cd "$root"
cargo build --release --locked --features cuda -p lsplit --target-dir target/cuda

# 4. The folder to copy: the stripped binary (also xz-compressed, for a size-limited copy),
#    run.sh, and what scripts/gpu-check.sh needs there: the `gguf` wheel and SmolLM2's
#    tokenizer keys (the synthetic models are generated there), and SmolLM2 itself in pieces
#    of at most 30 MiB in OUT_DIR-smollm2 (to carry over several copies where one is limited).
mkdir -p "$out/wheels"
cp target/cuda/release/lsplit "$out/lsplit"
strip "$out/lsplit"
xz -T0 -6 -k -f "$out/lsplit"
cp scripts/cuda-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
"$venv/bin/pip" install --quiet --disable-pip-version-check "gguf==0.19.0" numpy
"$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps "gguf==0.19.0" \
    -d "$out/wheels"
smol=${LSPLIT_SMOLLM2:-$HOME/.cache/lambda-split/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -f "$smol" ]; then
    "$venv/bin/python" bench/make_synthetic_gguf.py --tokenizer-from "$smol" \
        --tokenizer-only "$out/tokenizer.gguf" >/dev/null
    mkdir -p "$out-smollm2"
    split -b 30M -d "$smol" "$out-smollm2/SmolLM2.part-"
    sha256sum <"$smol" | cut -d' ' -f1 >"$out/SmolLM2.sha256"
else
    echo "no SmolLM2 at $smol (run \`lsplit fetch\`): tokenizer.gguf and the pieces are missing" >&2
fi
echo "built $out: lsplit $(du -h "$out/lsplit" | cut -f1), lsplit.xz $(du -h "$out/lsplit.xz" | cut -f1)"
