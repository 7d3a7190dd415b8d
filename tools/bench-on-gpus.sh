#!/usr/bin/env bash
# One model's bench.json for several precisions on a machine with several GPUs, one precision
# chain (calibrate -> engine -> bench) per GPU at a time, in the order given.
#
#   tools/bench-on-gpus.sh MODEL PRECISION... [-- SNAKEMAKE_ARGS...]
#   tools/bench-on-gpus.sh xl-1.0-arch int8 fp8 -- --configfile config/config.yaml config/overlays/gpu-arch-bench.yaml
#
# Snakemake's local executor runs GPU jobs side by side but gives them no GPU of their own, so
# each chain is its own snakemake process pinned with CUDA_VISIBLE_DEVICES (--nolock: they build
# disjoint outputs). The stages the chains share (model, reference images) are built first.
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
mkdir -p logs
echo "$model: ${precisions[*]} on $gpus GPU(s)"
snakemake --cores "$cores" "${extra[@]}" -- "resources/models/$model" "results/$model/reference" || exit 1

pids=()
for ((gpu = 0; gpu < gpus && gpu < ${#precisions[@]}; gpu++)); do
    (
        failed=0
        for ((i = gpu; i < ${#precisions[@]}; i += gpus)); do
            target="results/$model/${precisions[i]}/bench.json"
            echo "GPU $gpu: $target"
            CUDA_VISIBLE_DEVICES=$gpu snakemake --nolock --cores $((cores / gpus)) "${extra[@]}" -- "$target" || failed=1
        done
        exit $failed
    ) > "logs/bench-on-gpu$gpu.log" 2>&1 &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for ((gpu = 0; gpu < ${#pids[@]}; gpu++)); do echo "== logs/bench-on-gpu$gpu.log"; tail -n 5 "logs/bench-on-gpu$gpu.log"; done
exit $failed
