#!/usr/bin/env bash
# GPU check: train ResNet-50 and VGG-16 for a few epochs on the real CIFAR-10 data on one GPU, then print
# images/s, epoch time, peak GPU memory and accuracy per model. Needs torch, torchvision, pytorch-lightning,
# torchmetrics and tensorboard already installed (no network is used). Under 8 minutes on an H100 or H200.
#
# The JPEG folder does not travel to a remote GPU machine as it is (60,000 small files); pack it once here:
#   mkdir -p .gpu_data && tar -czf .gpu_data/cifar10-jpeg.tar.gz -C ../shared/data cifar10-jpeg
#   echo /.gpu_data/ >> .git/info/exclude
# then, on the GPU machine, from the project root (the archive carried along):
#   bash bench/gpu_check.sh .gpu_data/cifar10-jpeg.tar.gz
# A data folder works too: bash bench/gpu_check.sh ../shared/data/cifar10-jpeg
# Flags after the data go to both train.py runs; ACCELERATOR=cpu with a few batches is a dry run of the script:
#   ACCELERATOR=cpu EPOCHS=1 bash bench/gpu_check.sh DATA --limit-train-batches 2 --limit-val-batches 1 --limit-test-batches 1
set -euo pipefail
cd "$(dirname "$0")/.."

source_data=${1:-.gpu_data/cifar10-jpeg.tar.gz}
shift $(( $# > 0 ? 1 : 0 ))
epochs=${EPOCHS:-5}
accelerator=${ACCELERATOR:-gpu}
work=${GPU_CHECK_DIR:-/tmp/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$work"

if [ -d "$source_data" ]; then
  data=$source_data
else
  tar -xzf "$source_data" -C "$work"
  data=$work/cifar10-jpeg
fi

if [ "$accelerator" != cpu ]; then  # gpu or cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$python" -c "import torch, torchvision, pytorch_lightning as pl; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| lightning', pl.__version__, '| cuda', torch.cuda.is_available())"

for model in resnet50 vgg16; do
  start=$(date +%s)
  # The whole output stays in $work/$model.log; its end is shown, more of it when the run fails.
  if ! "$python" train.py --model "$model" --accelerator "$accelerator" --devices 1 --data-dir "$data" \
      --cache-dir "$work/cache" --logdir "$work/logs_$model" --epochs "$epochs" --progress-refresh 0 \
      --checkpoint-every-n-steps 0 "$@" > "$work/$model.log" 2>&1; then
    tail -n 20 "$work/$model.log"
    echo "$model: train.py failed; whole output in $work/$model.log" >&2
    exit 1
  fi
  tail -n 2 "$work/$model.log"
  echo "$model: whole run $(( $(date +%s) - start )) s"
done

"$python" - "$work" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, ".")
from bench.runs import run_summary, scalars

work = Path(sys.argv[1])
print("\n| model | epochs | images/s (median epoch) | epoch time (median) | peak GPU memory | best val acc | test acc |")
print("|---|---|---|---|---|---|---|")
for run in sorted(work.glob("logs_*/version_*")):
    summary = run_summary(run)
    series = scalars(run)
    def median(tag):
        values = sorted(v for _, _, v in series.get(tag, []))
        return values[len(values) // 2] if values else float("nan")
    print(f"| {summary['model']} | {summary['epochs']} | {median('perf/train_images_per_sec'):.0f} | "
          f"{median('perf/epoch_seconds'):.1f} s | {median('perf/gpu_max_memory_gib'):.2f} GiB | "
          f"{100 * (summary['best_val_acc'] or 0):.2f} % | {100 * (summary['test_acc'] or 0):.2f} % |")
PY
