#!/usr/bin/env bash
# Export a local float HF checkpoint to ONNX with the onnxruntime-genai model builder
# (python -m onnxruntime_genai.models.builder), fully offline, for the CPU execution provider:
#
#   OUT_ROOT/genai-int4/   int4 weight-only (MatMulNBits, builder defaults: RTN, symmetric,
#                          block_size 32, accuracy_level 4; tied embedding shares the int4 lm_head
#                          through GatherBlockQuantized)
#   OUT_ROOT/genai-fp32/   float32 reference export
#   OUT_ROOT/genai-int4.log, OUT_ROOT/genai-fp32.log   full builder output
#
# Usage:  bash benchmarks/peers/run_ortgenai_builder.sh HF_DIR OUT_ROOT [extra builder args ...]
#   e.g.  bash benchmarks/peers/run_ortgenai_builder.sh benchmarks/out/gptq/smollm2-hf benchmarks/out/onnx
#         ... --extra_options block_size=128 accuracy_level=1     (applies to both builds)
# Env overrides:
#   ORTGENAI_PY   interpreter (default: benchmarks/.venvs/ortgenai/bin/python, made by
#                 `bash benchmarks/peers/setup_venvs.sh ortgenai`)
#   PRECISIONS    default "int4 fp32"
#
# Each output folder is deleted and rebuilt. Wall time of each build is printed and written to the log.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 HF_DIR OUT_ROOT [extra builder args ...]" >&2
  exit 2
fi
HF_DIR="$1"; OUT_ROOT="$2"; shift 2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${ORTGENAI_PY:-$ROOT/benchmarks/.venvs/ortgenai/bin/python}"
PRECISIONS="${PRECISIONS:-int4 fp32}"

[ -x "$PY" ] || { echo "missing $PY: run 'bash benchmarks/peers/setup_venvs.sh ortgenai'" >&2; exit 2; }
[ -f "$HF_DIR/config.json" ] || { echo "$HF_DIR has no config.json" >&2; exit 2; }

# No model hub is reachable: never try one. With a local folder as -i the builder reads config,
# tokenizer and safetensors from it directly; -c is only used for temporary files.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

mkdir -p "$OUT_ROOT"
CACHE="$OUT_ROOT/genai-cache"
for p in $PRECISIONS; do
  out="$OUT_ROOT/genai-$p"
  log="$OUT_ROOT/genai-$p.log"
  rm -rf "$out"
  echo ">>> onnxruntime-genai builder: $HF_DIR -> $out (-p $p -e cpu)"
  t0=$(date +%s.%N)
  if ! "$PY" -m onnxruntime_genai.models.builder \
        -i "$HF_DIR" -o "$out" -p "$p" -e cpu -c "$CACHE" "$@" >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "builder failed for -p $p (full log: $log)" >&2
    exit 1
  fi
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  echo "wall_s=$wall" >>"$log"
  echo "    done in ${wall} s"
  ls -l "$out"
done
