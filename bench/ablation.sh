#!/usr/bin/env bash
# The course seed's open question: does its shorter network (resnet50_seed: three stages, downsampling in the
# last block of stages 2 and 3, 1024 channels at the end) trail ResNet-50 because it lacks the fourth stage?
# Trains resnet50_seed, resnet50 and vgg16 one after another under one recipe (train.py's defaults with EPOCHS
# epochs, all at the images' own 32x32: --input-size 32), each into a new lightning_logs/version_N, then prints
# their results table for RESULTS.md.
#
#   bash bench/ablation.sh ../shared/data/cifar10-jpeg 4
#
# Run by hand (36 minutes at 4 epochs on a 2-core CPU with bf16), never by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash bench/ablation.sh DATA_DIR EPOCHS (a positive whole number)" >&2
  exit 2
fi
data_dir=$1 epochs=$2
python=${PYTHON:-python}
runs=()
for model in resnet50_seed resnet50 vgg16; do
  before=$(ls -d lightning_logs/version_* 2>/dev/null || true)
  "$python" train.py --model "$model" --data-dir "$data_dir" --epochs "$epochs" --input-size 32 --progress-refresh 100
  # The run's folder is the one version_N that did not exist before it.
  runs+=("$(comm -13 <(echo "$before" | sort) <(ls -d lightning_logs/version_* | sort))")
done
"$python" bench/summarize.py "${runs[@]}"
