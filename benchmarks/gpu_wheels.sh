#!/usr/bin/env bash
# Download (here, where the package index is reachable) the pure-Python wheels the GPU check
# needs that the GPU machine lacks, into .whl/ (git-ignored), to carry there with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==1.3.8" "omegaconf==2.3.1" "antlr4-python3-runtime==4.9.3"
ls .whl
