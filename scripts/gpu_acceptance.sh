#!/usr/bin/env bash
# GPU acceptance run (issue 28): one call on a lent H100/H200, from the repository root:
#
#   bash scripts/gpu_acceptance.sh [STAGE ...]     stages: setup te_step planner losses probe topd_step (default: all)
#   bash scripts/gpu_acceptance.sh --fetch         (on a CPU machine with PyPI) put the wheels into gpu_wheels/
#
# 1. Installs what a bare GPU image (python3 with torch, triton, CUDA, nvcc) lacks, from files carried in $GPU_WHEELS
#    (default gpu_wheels/, gitignored) into $GPU_SITE (default /tmp/gpu_site, kept while the machine stays warm):
#    megatron-core, POT, Transformer Engine (its core wheel, whole or as split .part-* files, its Python wheel, and
#    transformer_engine_torch as a wheel or built here from its sdist for sm_90). Each install is timed in
#    $OUT/install.tsv (then in setup.json); what is missing is said, with the file it needs. Nothing is installed
#    without CUDA.
# 2. Runs each stage of scripts/gpu_acceptance.py under its own `timeout`, one JSON per stage in $OUT (default
#    gpu_out/): status ok | failed | skipped, and a reason. Without CUDA every stage is skipped ("needs CUDA") and
#    the script exits 0 (the dry run of tests/unit/test_gpu_acceptance_dryrun.py). Exit 1 if a stage failed.
# docs/gpu_acceptance.md: what each stage measures and the CPU-side prediction each figure is compared with.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu_out}
WHEELS=${GPU_WHEELS:-gpu_wheels}
SITE=${GPU_SITE:-/tmp/gpu_site}
PY=${PYTHON:-python3}
ALL="setup te_step planner losses probe topd_step"
# seconds per stage; the sum with the installs stays inside one 10-minute device call (TE's sdist build aside)
declare -A LIMIT=([setup]=90 [te_step]=240 [planner]=60 [losses]=180 [probe]=150 [topd_step]=240)

if [ "${1:-}" = "--fetch" ]; then  # CPU side, where pip reaches PyPI: the files a GPU run carries
  mkdir -p "$WHEELS"
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
  for n in 17 24 27 28 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
  plat+=(--platform manylinux2014_x86_64)
  "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$WHEELS" megatron-core==0.19.2 pot==0.9.7.post1 \
    transformer-engine==2.20.2 transformer-engine-cu13==2.20.2 || exit 1
  for whl in "$WHEELS"/transformer_engine_cu13-*.whl; do  # 276 MB: over one call's 64 MiB, so in parts
    [ -f "$whl" ] && split -b 60M -d "$whl" "$whl.part-" && rm "$whl"
  done
  echo "transformer_engine_torch (sdist) is not fetched here: its metadata step needs CUDA. On a CUDA machine:"
  echo "  pip download --no-deps --no-binary=:all: -d $WHEELS transformer-engine-torch==2.20.2"
  ls -la "$WHEELS"
  exit 0
fi

STAGES=${*:-$ALL}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/install.tsv"
LOG="$OUT/acceptance.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/install.tsv"; say "install: $1: $2 ($4, $3 s)"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
first() { compgen -G "$1" | head -n 1; }
pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }

install_wheel() {  # component, import name, wheel glob
  local t0 whl
  if has "$2"; then record "$1" present 0 ok; return; fi
  whl=$(first "$WHEELS/$3")
  if [ -z "$whl" ]; then
    record "$1" "missing: needs $WHEELS/$3 (bash scripts/gpu_acceptance.sh --fetch on a CPU machine)" 0 missing
    return
  fi
  t0=$SECONDS
  if pip_target "$whl" >> "$LOG" 2>&1 && has "$2"; then record "$1" "wheel $(basename "$whl")" $((SECONDS - t0)) ok
  else record "$1" "wheel $(basename "$whl")" $((SECONDS - t0)) failed; fi
}

install_te() {
  local t0 core parts meta torchext sdist built
  if has transformer_engine.pytorch; then record transformer_engine present 0 ok; return; fi
  core=$(first "$WHEELS/transformer_engine_cu1*-*.whl")
  parts=$(first "$WHEELS/transformer_engine_cu1*-*.whl.part-00")
  if [ -z "$core" ] && [ -n "$parts" ]; then  # split to travel in 64 MiB calls: put back together
    core=/tmp/$(basename "${parts%.part-00}")
    cat "${parts%.part-00}".part-* > "$core"
  fi
  meta=$(first "$WHEELS/transformer_engine-*.whl")
  torchext=$(first "$WHEELS/transformer_engine_torch-*.whl")
  sdist=$(first "$WHEELS/transformer_engine_torch-*.tar.gz")
  if [ -z "$core" ] || [ -z "$meta" ] || { [ -z "$torchext" ] && [ -z "$sdist" ]; }; then
    record transformer_engine "missing: needs $WHEELS/transformer_engine_cu13-2.20.2-*.whl (or its .part-* files), \
transformer_engine-2.20.2-py3-none-any.whl and transformer_engine_torch-2.20.2 as a wheel or .tar.gz sdist; found: \
core=${core:-none} python=${meta:-none} torch_ext=${torchext:-${sdist:-none}}" 0 missing
    return
  fi
  t0=$SECONDS
  pip_target "$core" "$meta" >> "$LOG" 2>&1 || { record transformer_engine_core "wheels" $((SECONDS - t0)) failed; return; }
  record transformer_engine_core "wheels $(basename "$core") $(basename "$meta")" $((SECONDS - t0)) ok
  t0=$SECONDS
  if [ -z "$torchext" ]; then  # build the PyTorch extension against this torch, for sm_90 only
    built=/tmp/te_torch_build
    rm -rf "$built"
    if NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 MAX_JOBS=$(nproc) timeout 900 \
        "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$built" "$sdist" >> "$LOG" 2>&1; then
      torchext=$(first "$built/transformer_engine_torch-*.whl")
      record transformer_engine_torch_build "sdist $(basename "$sdist") for sm_90" $((SECONDS - t0)) ok
      # under 16 MiB it comes back with $OUT: carry it next time instead of building
      [ "$(stat -c %s "$torchext")" -lt 16000000 ] && cp "$torchext" "$OUT/"
      t0=$SECONDS
    else
      record transformer_engine_torch_build "sdist $(basename "$sdist") for sm_90" $((SECONDS - t0)) failed
      return
    fi
  fi
  if pip_target "$torchext" >> "$LOG" 2>&1 && has transformer_engine.pytorch; then
    record transformer_engine_torch "wheel $(basename "$torchext")" $((SECONDS - t0)) ok
  else
    record transformer_engine_torch "wheel $(basename "$torchext")" $((SECONDS - t0)) failed
  fi
}

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT GPU_WHEELS="$WHEELS"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # as the trainer sets it
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  mkdir -p "$SITE"
  install_wheel megatron_core megatron.core 'megatron_core-*.whl'
  install_wheel pot ot 'pot-*.whl'
  install_te
else
  record all "nothing installed: needs CUDA (torch sees no GPU)" 0 skipped
fi

status=0
for stage in $STAGES; do
  limit=${LIMIT[$stage]:-}
  if [ -z "$limit" ]; then say "unknown stage '$stage' (stages: $ALL)"; status=1; continue; fi
  rm -f "$OUT/$stage.json"
  say "== $stage (timeout ${limit} s)"
  timeout "$limit" "$PY" scripts/gpu_acceptance.py --stage "$stage" --out "$OUT" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ ! -f "$OUT/$stage.json" ]; then  # killed by its timeout, or died before writing
    why="exit code $rc"; [ "$rc" = 124 ] && why="timed out after $limit s"
    printf '{"stage": "%s", "status": "failed", "reason": "%s, no JSON written (see acceptance.log)"}\n' \
      "$stage" "$why" > "$OUT/$stage.json"
  fi
  [ "$rc" = 0 ] || status=1
done
# setup.json holds install.tsv's rows: drop the file (a device call brings back 8 files at most)
case " $STAGES " in *" setup "*) [ -f "$OUT/setup.json" ] && rm -f "$OUT/install.tsv" ;; esac
say "results in $OUT: $(cd "$OUT" && ls *.json | tr '\n' ' ')"
exit $status
