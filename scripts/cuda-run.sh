#!/usr/bin/env bash
# Runs the CUDA build of `lsplit` (scripts/build-cuda.sh) on a GPU machine: finds the CUDA 13
# libraries it links against (cuBLAS and its cuBLASLt, cuRAND, the CUDA runtime) in a CUDA
# toolkit or in a Python environment's `nvidia` wheels (PyTorch ships them), and runs it.
#
#   run.sh ARGS...        e.g. run.sh serve --device cuda --model model.gguf ...
#   LSPLIT_CUDA_LIBS=DIR  a directory holding those libraries, searched first
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
needed=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
candidates=()
[ -n "${LSPLIT_CUDA_LIBS:-}" ] && candidates+=("$LSPLIT_CUDA_LIBS")
candidates+=(/usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
for python in python3 python; do
    if command -v "$python" >/dev/null; then
        while IFS= read -r dir; do candidates+=("$dir"); done < <("$python" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "*", "lib")):
        print(lib)
EOF
)
    fi
done
path=""
for lib in "${needed[@]}"; do
    found=""
    for dir in "${candidates[@]}"; do
        if [ -e "$dir/$lib" ]; then found=$dir; break; fi
    done
    if [ -z "$found" ]; then
        if ldconfig -p 2>/dev/null | grep -q "$lib"; then continue; fi
        echo "run.sh: $lib not found (set LSPLIT_CUDA_LIBS to the directory that holds it)" >&2
        exit 1
    fi
    case ":$path:" in *":$found:"*) ;; *) path=$path${path:+:}$found ;; esac
done
export LD_LIBRARY_PATH=$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
exec "$here/lsplit" "$@"
