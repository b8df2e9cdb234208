#!/usr/bin/env bash
# Prepare a GPU machine's run from this checkout (it has no package index): wheels of what its
# image lacks into .whl/, and SmolLM2's tokenizer (from the default GGUF model) into
# .carry/tok for the benchmarks that detokenize or build grammars. Both are git-ignored
# (.git/info/exclude); carry them: carry [".whl", ".carry"], then on the machine
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=$PWD:/tmp/site
# Usage (repo root, on the development machine): bash benchmarks/device_prep.sh
set -euo pipefail
mkdir -p .git/info .whl .carry
for path in /.whl/ /.carry/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The GPU image (python 3.12) has torch, triton, transformers, numpy, httpx, anyio, h11,
# prometheus_client, msgpack, uvloop; these are what pagedllm and its tests need beside
# (aiohttp and its dependencies: `pagedllm bench serve`).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  fastapi starlette uvicorn httptools "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic_core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection sniffio pyzmq msgspec gguf opentelemetry-api \
  importlib-metadata==8.7.0 llguidance "xgrammar>=0.2,<0.3" apache-tvm-ffi \
  jsonschema jsonschema-specifications referencing rpds-py \
  aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
python3 - <<'PY'
from pagedllm.models.loader.default_model import find_default_model
from pagedllm.models.loader.gguf_tokenizer import load_gguf_tokenizer

load_gguf_tokenizer(find_default_model()).save_pretrained(".carry/tok")
PY
du -sh .whl .carry/tok
