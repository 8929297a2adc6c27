#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, each part bounded in time (a lent GPU is held by
# the minute): the CUDA tests, the GPT-2 124M MFU run (experiment=gpt2_124m) and the bench.
#
#   scripts/gpu_check.sh OUT [PART ...]     PART: env | tests | mfu | bench | profile
#
# On a lent GPU machine (a bare image): run scripts/gpu_prepare.sh here first and carry ".gpu";
# this script then puts src/ and .gpu/site on PYTHONPATH and .gpu/data where runs read the
# corpora (../shared/data). A call returns at most 8 files: OUT/<part>.log per part (each mfu
# variant's summary line and throughput record are in mfu.log), bench_cuda.md, profile.txt, and
# the full logs of the mfu runs packed in OUT/mfu_logs.tgz.
# Extra train.py overrides for every mfu variant: MFU_ARGS="model.compile_mode=... ...";
# MFU_STEPS (300) steps per run, MFU_TIMEOUT (280) seconds per run (b32_mag autotunes longer).
# One mfu variant compiles for 1-2 minutes: two or three variants fit in one 600 s call.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT [env tests mfu bench profile]}
shift
PARTS=${*:-env tests}   # more parts than these rarely fit in one 600 s device call
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."   # paths below are the repository's
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpu/site ]; then
  export PYTHONPATH="$PWD/src:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -e ../shared/data ] && [ -d .gpu/data ]; then
  mkdir -p ../shared && ln -sfn "$PWD/.gpu/data" ../shared/data \
    || echo "cannot link ../shared/data to .gpu/data: pass paths.data_dir=.gpu/data in MFU_ARGS"
fi

part_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY - <<'EOF'
import torch, lightning, transformers
import hydra, omegaconf, lmlab.train  # what every other part needs: fail here, not there
print("hydra", hydra.__version__, "omegaconf", omegaconf.__version__, "lmlab imports")
print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning", lightning.__version__,
      "transformers", transformers.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
      "flash sdpa:", torch.backends.cuda.flash_sdp_enabled())
EOF
  ls ../shared/data | head -3
}

part_tests() {
  # The CUDA-only tests, the ones never run yet first; DeepSpeed is not in the image.
  timeout 400 $PY -m pytest -q -p no:cacheprovider \
    "tests/models/test_moe.py::test_dropless_routing_on_a_gpu_equals_the_gather" \
    "tests/test_step_syncs.py::test_cuda_training_steps_never_synchronize[moe-dropless]" \
    "tests/callbacks/test_memory.py::test_cuda_peak_is_each_runs_own_in_one_process" \
    tests/strategies/test_gpu.py tests/callbacks tests/test_step_syncs.py \
    tests/models/test_fused_cross_entropy.py tests/models/test_moe.py -k "cuda or gpu" 2>&1 | tail -25
}

# One short run of the recipe per variant; the summary is the record's `throughput`.
mfu_run() {
  local name=$1; shift
  local dir=/tmp/mfu_$name
  rm -rf "$dir"
  mkdir -p "$OUT/mfu_logs"
  # -k: a SIGTERM'd run finishes its step and saves last.ckpt first; never into the next variant.
  # No checkpoints: a 1.5 GB save is device time that measures nothing.
  timeout -k 20 ${MFU_TIMEOUT:-280} $PY train.py experiment=gpt2_124m trainer.max_steps=${MFU_STEPS:-300} \
    trainer.val_check_interval=${MFU_STEPS:-300} callbacks.last_checkpoint.every_n_steps=null \
    '~callbacks.model_checkpoint' '~callbacks.last_checkpoint' +trainer.enable_checkpointing=false test=false validate_after_fit=false print_config=false \
    hydra.run.dir="$dir" ${MFU_ARGS:-} "$@" >"$OUT/mfu_logs/$name.log" 2>&1
  echo "[$name] exit $?"
  $PY - "$dir/metrics.json" <<'EOF'
import json, sys
try:
    record = json.load(open(sys.argv[1]))
except OSError as error:
    print("  no record:", error); sys.exit()
t = record.get("throughput") or {}
print("  record:", json.dumps({"throughput": t, "memory": record.get("memory"),
                               "overrides": record.get("overrides"), "status": record.get("status")}))
mfu = t.get("mfu")
print(f"  {t.get('tokens_per_sec') or 0:,.0f} tok/s  {t.get('tflops_per_sec') or 0:.1f} TFLOP/s  "
      f"MFU {mfu if mfu is None else f'{mfu:.1%}'}  batches {t.get('batches_measured')}  "
      f"peak {t.get('peak_tflops')} ({t.get('peak_source')})  cuda peak "
      f"{(record.get('memory') or {}).get('cuda_peak_allocated_bytes', 0) / 2**30:.1f} GiB")
EOF
}

part_mfu() {
  for variant in ${MFU_VARIANTS:-recipe}; do
    case $variant in
      recipe) mfu_run recipe ;;  # as shipped (batch 32)
      b16) mfu_run b16 data.batch_size=16 ;;
      b32) mfu_run b32 data.batch_size=32 ;;  # = recipe, named for comparisons
      b16_eager) mfu_run b16_eager data.batch_size=16 model.compile=false ;;
      b16_ro) mfu_run b16_ro data.batch_size=16 model.compile_mode=reduce-overhead ;;
      b64) mfu_run b64 data.batch_size=64 ;;  # b16 -> b32 bought 4.6 points; ~31 GiB expected
      b32_ro) mfu_run b32_ro data.batch_size=32 model.compile_mode=reduce-overhead ;;
      b16_ro_acc) mfu_run b16_ro_acc data.batch_size=8 trainer.accumulate_grad_batches=2 model.compile_mode=reduce-overhead ;;
      b16_ma) mfu_run b16_ma data.batch_size=16 model.compile_mode=max-autotune-no-cudagraphs ;;
      b32_mag) mfu_run b32_mag data.batch_size=32 model.compile_mode=max-autotune ;;  # > 280 s of autotuning on an H100: raise MFU_TIMEOUT
      b16_sync) mfu_run b16_sync data.batch_size=16 callbacks.nonfinite.check_every_n_steps=1 ;;
      # what a run does beyond profile_step's bare loop: no clipping, then no non-finite check either
      b16_noclip) mfu_run b16_noclip data.batch_size=16 trainer.gradient_clip_val=null ;;
      b16_lean) mfu_run b16_lean data.batch_size=16 trainer.gradient_clip_val=null '~callbacks.nonfinite' ;;
      *) echo "[$variant] unknown variant (recipe b16 b32 b64 b16_eager b16_ro b32_ro b16_ro_acc b16_ma b32_mag b16_sync b16_noclip b16_lean): skipped" ;;
    esac
  done
  [ -d "$OUT/mfu_logs" ] && tar -czf "$OUT/mfu_logs.tgz" -C "$OUT" mfu_logs && rm -rf "$OUT/mfu_logs"
}

part_bench() {
  # At the default GPU size the whole bench takes longer than one 600 s device command: give
  # parts, e.g. BENCH_ARGS="--only train" in one call, "--only generate loops encoders" in another.
  timeout ${BENCH_TIMEOUT:-540} $PY -m bench.run --device cuda ${BENCH_ARGS:-} --out "$OUT/bench_cuda.md" 2>&1 | tail -40
}

part_profile() {
  timeout ${PROFILE_TIMEOUT:-400} $PY -m bench.profile_step --out "$OUT/profile.txt" ${PROFILE_ARGS:-} 2>&1 | tail -40
}

for part in $PARTS; do
  echo "== $part ($(date +%T))"
  "part_$part" 2>&1 | tee "$OUT/$part.log"
done
echo "== done ($(date +%T))"
