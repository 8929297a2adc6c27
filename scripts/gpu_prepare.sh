#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: packs into .gpu/ (git-ignored) what the
# lent GPU machines' image lacks, so that scripts/gpu_check.sh runs there from a bare start.
#
#   scripts/gpu_prepare.sh        then: device run with carry [".gpu"] and the command
#                                 "scripts/gpu_check.sh OUT_DIR env mfu" (or other parts)
#
# The image (Python 3.12, torch, lightning, transformers, peft, tokenizers, sacrebleu) has no
# hydra-core, omegaconf or antlr4: pure-Python packages, copied from this venv. bitsandbytes,
# deepspeed, wandb and submitit stay behind (lmlab imports them only when a run uses them; the
# CUDA tests that need them skip). The corpora are copied too: only the checkout travels, not
# the ../shared beside it. About 21 MB of the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpu
mkdir -p .gpu/site
for pkg in hydra omegaconf antlr4 hydra_core-*.dist-info omegaconf-*.dist-info antlr4_python3_runtime-*.dist-info; do
  cp -r "$site"/$pkg .gpu/site/
done
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
cp -r ../shared/data .gpu/data
chmod -R u+w .gpu/data  # the corpora are read-only here: a rerun must be able to remove them
du -sh .gpu
