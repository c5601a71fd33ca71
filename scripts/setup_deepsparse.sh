#!/usr/bin/env bash
# Create .venv-deepsparse/ in the repo root: Python 3.11, deepsparse==1.8.0, numpy<2,
# onnxruntime (reference engine for the output check), pinned by constraints-deepsparse.txt.
#
# Why a second environment: DeepSparse 1.8 runs only on Python <= 3.11 and returns silently
# wrong outputs when numpy 2 is installed, while JAX needs numpy >= 2. The library drives this
# environment as a subprocess (convert/deepsparse.py).
#
# Idempotent: if the venv exists, was built from the current constraints file and imports
# cleanly, nothing is done. Options:
#   --force    rebuild from scratch
#   --freeze   after installing, rewrite constraints-deepsparse.txt from `pip freeze`
#   --no-check skip the DeepSparse-vs-numpy MatMul check
# Env: PYTHON (default: python3.11), DEEPSPARSE_VENV (default: <repo>/.venv-deepsparse)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPSPARSE_VENV:-$ROOT/.venv-deepsparse}"
CONSTRAINTS="$ROOT/constraints-deepsparse.txt"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.ellava-setup-stamp"
FORCE=0
FREEZE=0
CHECK=1
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --freeze) FREEZE=1 ;;
    --no-check) CHECK=0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

REQS=("deepsparse==1.8.0" "numpy<2" "onnxruntime" "onnx")

want_stamp() {
  # the stamp records the requirements and the constraints file the venv was built from
  {
    printf '%s\n' "${REQS[@]}"
    if [[ -f "$CONSTRAINTS" ]]; then sha256sum "$CONSTRAINTS" | cut -d' ' -f1; fi
  } | sha256sum | cut -d' ' -f1
}

check_matmul() {
  # DeepSparse must reproduce a small MatMul (with a 50%-sparse constant weight) exactly enough.
  "$VENV/bin/python" - <<'PY'
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

assert np.__version__.split(".")[0] == "1", f"numpy {np.__version__} in the DeepSparse venv; need <2"
rng = np.random.default_rng(0)
w = rng.standard_normal((256, 512)).astype(np.float32)
w[np.abs(w) < np.quantile(np.abs(w), 0.5)] = 0.0
x = rng.standard_normal((4, 16, 256)).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w"], ["y"])],
    "matmul_check",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16, 512])],
    initializer=[numpy_helper.from_array(w, "w")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
import os, tempfile
path = os.path.join(tempfile.mkdtemp(), "matmul.onnx")
onnx.save(model, path)
from deepsparse import compile_model
engine = compile_model(path, batch_size=4, num_cores=1)
(y,) = engine.run([x])
ref = x @ w
err = float(np.max(np.abs(y - ref)))
print(f"deepsparse MatMul check: max abs err {err:.2e} (outputs up to {np.abs(ref).max():.1f})")
assert err < 1e-3, f"DeepSparse MatMul differs from numpy by {err}"
PY
}

if [[ $FORCE == 0 && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]] \
   && "$VENV/bin/python" -c "import deepsparse, onnxruntime, onnx, numpy; assert numpy.__version__ < '2'" 2>/dev/null; then
  echo "setup_deepsparse: $VENV is up to date"
  exit 0
fi

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_deepsparse: $PY not found (DeepSparse 1.8 needs Python 3.8-3.11)" >&2
  exit 1
fi
if [[ "$("$PY" -c 'import sys; print(sys.version_info[:2] <= (3, 11))')" != True ]]; then
  echo "setup_deepsparse: $PY is $("$PY" -V); DeepSparse 1.8 needs Python <= 3.11" >&2
  exit 1
fi

echo "setup_deepsparse: creating $VENV with $("$PY" -V)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
PIP_ARGS=()
if [[ -f "$CONSTRAINTS" && $FREEZE == 0 ]]; then PIP_ARGS+=(-c "$CONSTRAINTS"); fi
"$VENV/bin/python" -m pip install --quiet --no-compile "${PIP_ARGS[@]}" "${REQS[@]}"

if [[ $FREEZE == 1 ]]; then
  {
    echo "# Pins for .venv-deepsparse (scripts/setup_deepsparse.sh --freeze regenerates this)."
    echo "# DeepSparse 1.8 needs numpy < 2 and Python <= 3.11."
    "$VENV/bin/python" -m pip freeze --exclude-editable
  } > "$CONSTRAINTS"
  echo "setup_deepsparse: wrote $CONSTRAINTS"
fi

if [[ $CHECK == 1 ]]; then check_matmul; fi
want_stamp > "$STAMP"
echo "setup_deepsparse: done"
