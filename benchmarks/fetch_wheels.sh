#!/usr/bin/env bash
# Run here (with PyPI), before a GPU session: fetches into .whl/ the Python 3.12 wheels the GPU image
# lacks, which gpu_session.sh installs there: the CUTLASS headers (build), the peers the benchmark runs
# (FLA, jax-linear-attention) and the Jupyter stack the notebook step uses. .whl/ is git-ignored
# locally (.git/info/exclude) and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
build_and_peers="nvidia-cutlass==4.2.0.0 flash-linear-attention==0.6.0 fla-core==0.6.0 jax-linear-attention==0.1.0"
notebooks="nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 jupyter-client==8.10.0 jupyter-core==5.9.1
  comm==0.2.3 debugpy==1.8.22 ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7
  matplotlib-inline==0.2.2 nest-asyncio2==1.7.4 pyzmq==27.3.0 tornado==6.6.1 traitlets==5.16.1
  fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1 platformdirs==4.14.9 prompt-toolkit==3.0.53 wcwidth==0.9.4 pexpect==4.9.0
  ptyprocess==0.7.0 stack-data==0.6.3 asttokens==3.0.2 executing==2.3.0 pure-eval==0.2.4"
platforms=""
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=" --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .whl $build_and_peers $notebooks
du -sh .whl
