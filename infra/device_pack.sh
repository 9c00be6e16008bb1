#!/usr/bin/env bash
# Build build/device/site.tar.xz: the Python packages fundus_batch needs that the lent GPU
# machine's image lacks (Ray, pydantic and their small dependencies), for its Python 3.12 x86-64.
#
# The GPU image already holds torch (CUDA), numpy, pandas, pyarrow, opencv, scikit-image,
# pillow, fsspec, jinja2, click, tqdm, psutil, pyyaml, msgpack, protobuf, requests, filelock and
# attrs (/work/.library/device/KINDS.md). It has no Ray and no pydantic, and it cannot reach a
# registry, so they travel through the device tool's `carry` (64 MiB per call, working tree
# included). The Ray wheel alone is ~79 MB (32 MB of it the Java jar), so it is unpacked here,
# stripped of parts fundus_batch never loads (Java, the dashboard's web client, RLlib, Serve,
# LLM) and packed with xz. build/ is git-ignored, so the bundle never enters the repository.
#
#     bash infra/device_pack.sh          # needs network here; run once, before device_bench.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
DEST="$ROOT/build/device"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The versions installed here, so the device runs what the tests here ran.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=()
for name in ray pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    jsonschema jsonschema-specifications referencing rpds-py; do
    PKGS+=("$name==$(version "$name")")
done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WORK/wheels" "${PKGS[@]}"

mkdir -p "$WORK/site"
for whl in "$WORK"/wheels/*.whl; do
    unzip -q -o "$whl" -d "$WORK/site"
done
# Ray starts these as subprocesses: make sure they stay executable.
find "$WORK/site/ray/core" -type f \( -name raylet -o -name gcs_server -o -name '*.so' \) \
    -exec chmod +x {} +
rm -rf "$WORK/site/ray/jars" "$WORK/site/ray/dashboard/client" "$WORK/site/ray/rllib" \
    "$WORK/site/ray/serve" "$WORK/site/ray/llm"
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$DEST"
tar -C "$WORK/site" -cf - . | xz -T0 -9 > "$DEST/site.tar.xz"
printf '%s\n' "${PKGS[@]}" > "$DEST/packages.txt"
du -h "$DEST/site.tar.xz"
