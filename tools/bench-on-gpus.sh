#!/usr/bin/env bash
# One model's bench.json for several precisions on a machine with several GPUs.
#
#   tools/bench-on-gpus.sh MODEL PRECISION... [-- SNAKEMAKE_ARGS...]
#   tools/bench-on-gpus.sh xl-1.0-arch int8 fp8 -- --configfile config/config.yaml config/overlays/gpu-arch-bench.yaml
#
# Snakemake's local executor runs GPU jobs side by side but gives them no GPU of their own, so each
# job here is its own snakemake process pinned with CUDA_VISIBLE_DEVICES (--nolock: they build
# disjoint outputs). Three phases:
#   1. the stages every precision shares (model, reference images);
#   2. every precision's calibration and engine at once, spread over the GPUs: an engine build is
#      mostly compiler work on the CPU, and the GPUs have memory for several;
#   3. the benches, one per GPU at a time, in the order given: a timing shares its GPU with nothing;
#      a precision whose phase 2 failed is left out (exit status 1).
# On Slurm none of this is needed: the executor gives each job its GPU (docs/CLUSTER.md).
set -uo pipefail
usage="usage: $0 MODEL PRECISION... [-- SNAKEMAKE_ARGS...]"
(($#)) || { echo "$usage" >&2; exit 2; }
model=$1; shift
precisions=()
while (($#)) && [[ $1 != -- ]]; do precisions+=("$1"); shift; done
(($#)) && shift
((${#precisions[@]})) || { echo "$usage" >&2; exit 2; }
extra=("$@")

gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())') || exit 1
((gpus > 0)) || { echo "$0: no GPU visible; run snakemake directly" >&2; exit 1; }
cores=$(nproc)
n=${#precisions[@]}
mkdir -p logs
echo "$model: ${precisions[*]} on $gpus GPU(s)"

# Runs `snakemake TARGET [ARGS]` on GPU $1 with $2 cores, logging to logs/bench-on-gpus-$3.log.
on_gpu() {
    local gpu=$1 ncores=$2 name=$3; shift 3
    echo "GPU $gpu: $name"
    CUDA_VISIBLE_DEVICES=$gpu snakemake --nolock --cores "$ncores" "${extra[@]}" "$@" \
        >> "logs/bench-on-gpus-$name.log" 2>&1 || { echo "failed: $name (logs/bench-on-gpus-$name.log)"; return 1; }
}

snakemake --cores "$cores" "${extra[@]}" -- "resources/models/$model" "results/$model/reference" || exit 1

failed=0
pids=()
for ((i = 0; i < n; i++)); do
    on_gpu $((i % gpus)) $(((cores + n - 1) / n)) "${precisions[i]}" \
        --until engine_torch engine_tensorrt -- "results/$model/${precisions[i]}/bench.json" &
    pids+=($!)
done
# A precision whose calibration or engine failed gets no bench: snakemake would only retry the
# same build there, serially on its GPU, before failing the same way.
ready=()
for ((i = 0; i < n; i++)); do
    if wait "${pids[i]}"; then
        ready+=("${precisions[i]}")
    else
        failed=1
        echo "skipped: ${precisions[i]} bench (its engine phase failed)"
    fi
done

pids=()
for ((gpu = 0; gpu < gpus && gpu < ${#ready[@]}; gpu++)); do
    (
        status=0
        for ((i = gpu; i < ${#ready[@]}; i += gpus)); do
            on_gpu $gpu $((cores / gpus)) "${ready[i]}" -- "results/$model/${ready[i]}/bench.json" || status=1
        done
        exit $status
    ) &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for p in "${precisions[@]}"; do echo "== logs/bench-on-gpus-$p.log"; tail -n 3 "logs/bench-on-gpus-$p.log"; done
exit $failed
