#!/usr/bin/env bash
# Carry what the GPU machine lacks, for benchmarks/gpu_check.py.
#
# The lent GPU machine has no internet; its python3 has torch, transformers, accelerate, safetensors,
# tokenizers, numpy, jinja2 and psutil (and, through transformers, pyyaml, tqdm and packaging), but not
# gguf, textual, starlette, uvicorn, bitsandbytes or pytest. What gpu_check.py imports of those:
#   gguf    -- yes: the architecture registry imports each architecture's GGUF tensor map at import time
#              (localglm/models/*/gguf.py, checkpoint/gguf*.py); pure Python, 1.4 MB.
#   pytest  -- for the `cuda`-marked tests (with pluggy, iniconfig, pygments; exceptiongroup and tomli
#              for a python older than 3.11); pure Python.
#   textual, starlette, uvicorn -- no: only `localglm chat` / `localglm serve` import them, and the check
#              runs neither (the env part records what `import localglm` pulled in).
#   bitsandbytes -- not carried (its wheel is ~60 MB of CUDA libraries); gpu_check records its part as skipped.
#
# This script, run here (with internet), downloads those wheels into .wheels/ (git-ignored) and unpacks
# them into .wheels/site, which gpu_check.py puts on its path: nothing is installed on the device.
# Then it checks, on this machine, that the check's imports resolve with only what the device has plus
# .wheels/site (the packages above blocked from the local environment).
#
# The device command (device tool: carry=[".wheels"]; the tree that travels stays ~27 MB + 8 MB):
#   python3 benchmarks/gpu_check.py --out $OUT
# or, with an install instead of the path:
#   pip install --no-index --find-links .wheels --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_check.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GGUF_VERSION=${GGUF_VERSION:-0.19.0}
WHEELS=(
  "gguf==${GGUF_VERSION}"
  "pytest==8.4.2" "pluggy>=1.5,<2" "iniconfig>=1" "pygments>=2.7.2" "exceptiongroup>=1" "tomli>=1"
)

mkdir -p .wheels
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.10 --implementation py --dest .wheels "${WHEELS[@]}"
rm -rf .wheels/site
mkdir -p .wheels/site
for w in .wheels/*.whl; do
  "$PY" -m zipfile -e "$w" .wheels/site
done
echo "gpu_wheels: $(ls .wheels/*.whl | wc -l) wheels in .wheels/, unpacked into .wheels/site ($(du -sh .wheels | cut -f1))"

# Verify: the check's imports with the device's missing packages blocked from this environment.
BLOCK=$(mktemp -d)
trap 'rm -rf "$BLOCK"' EXIT
cat > "$BLOCK/sitecustomize.py" <<'EOF'
"""Hide packages the GPU machine lacks, except copies under .wheels/site (what gpu_wheels.sh carries)."""
import importlib.abc
import importlib.machinery
import sys

MISSING = {"gguf", "textual", "starlette", "uvicorn", "bitsandbytes", "pytest", "_pytest", "pluggy", "iniconfig", "pygments", "llama_cpp"}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in MISSING:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and ".wheels/site" in str(spec.origin or spec.submodule_search_locations):
            return spec
        raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine does not have it)")


sys.meta_path.insert(0, _Block())
EOF
PYTHONPATH="$BLOCK:.wheels/site:." "$PY" -c "
import localglm, offload.backend, quant.cuda_kernels, sys
bad = sorted(m for m in sys.modules if m.split('.')[0] in {'textual', 'starlette', 'uvicorn', 'bitsandbytes'})
assert not bad, bad
import gguf, pytest
assert '.wheels/site' in gguf.__file__ and '.wheels/site' in pytest.__file__
print(f'gpu_wheels: imports resolve with the device packages + .wheels/site (gguf and pytest {pytest.__version__} from there)')
"
PYTHONPATH="$BLOCK" "$PY" benchmarks/gpu_check.py --rehearse --parts env,cuda_tests --out "$BLOCK/check" > /dev/null
"$PY" - "$BLOCK/check/gpu_check.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["parts"]
assert r["env"]["status"] == "ok" and r["cuda_tests"]["status"] == "ok", {k: (v["status"], v.get("error") or v.get("output_tail", "")[-800:]) for k, v in r.items()}
print(f"gpu_wheels: rehearsal of env + cuda_tests ok with only .wheels/site added (pulled in: {r['env']['localglm_imports_optional']}; cuda tests collected and skipped: {r['cuda_tests']['skipped']})")
EOF
