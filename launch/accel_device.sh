#!/usr/bin/env bash
# The device benchmark, `python -m bench.accel run`, on a GPU or TPU machine whose image has jax (with its
# accelerator plugin), flax, optax, orbax, torch and transformers, but not the rest of pyproject.toml.
# bench.accel needs one more package there, ml_collections (pure Python; absl-py and PyYAML it needs are there).
#
#   launch/accel_device.sh wheels      here, where pip reaches PyPI: the wheel into .whl/ (git-ignored)
#   launch/accel_device.sh run OUT [ARGS]  there, from the repository root (the working tree and .whl/ copied over):
#                                      installs .whl/ into /tmp/site, runs the benchmark (with ARGS), writes
#                                      OUT/accel.json
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  wheels)
    python3 -m pip download --no-deps --only-binary=:all: -d .whl "ml-collections==1.1.0" ;;
  run)
    out="${2:-.}"
    shift $(( $# < 2 ? $# : 2 ))
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 -m bench.accel run --out "$out/accel.json" "$@" ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
