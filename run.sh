#!/usr/bin/env bash
# The whole pipeline, in order; `bash run.sh --help` says how to run it.
if [ -z "${BASH_VERSION:-}" ]; then  # started by sh (dash) or another shell: the rest needs bash
    if command -v bash >/dev/null 2>&1; then exec bash "$0" "$@"; fi
    echo "run.sh needs bash, which is not installed; install it and run: bash run.sh $*" >&2
    exit 2
fi
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash run.sh [--smoke] [--source COCO_FOLDER] [TRAIN.PY FLAGS...]

The whole pipeline, in order: data2csv.py -> csv2json.py -> train.py -> infer.py.

  bash run.sh                   600 COCO 2014 pictures and Qwen2-VL-2B-Instruct (about 4.5 GB) from ModelScope -> CSV
                                -> JSON -> LoRA fine-tune on the GPU -> captions of the held-out pictures
  bash run.sh --source DIR      the pictures from a local COCO folder (train2014/, val2014/, annotations/) instead of
                                ModelScope: what to do when ModelScope cannot be reached
  bash run.sh --smoke           the same steps offline on a CPU: tiny model, generated pictures, about a minute;
                                files go to $SMOKE_DIR (default: smoke/)
  bash run.sh --epochs 1        any other argument goes to train.py (python train.py --help lists them); their names
                                and values are checked, and a GPU looked for, before anything is downloaded
  bash run.sh --help            this text

Python: $PYTHON, else .venv/bin/python, else python.
EOF
}

cd "$(dirname "$0")"
smoke=0
source=()  # the data steps' --source, when given
take_source=0
for arg; do  # run.sh's own flags, anywhere; every other argument stays in "$@" for train.py
    shift
    if [ $take_source = 1 ]; then source=(--source "$arg"); take_source=0; continue; fi
    case $arg in
        --smoke) smoke=1 ;;
        --source) take_source=1 ;;
        --source=*) source=(--source "${arg#--source=}") ;;
        -h | --help) usage; exit 0 ;;
        *) set -- "$@" "$arg" ;;
    esac
done
if [ $take_source = 1 ]; then echo "run.sh: error: --source needs a folder: --source COCO_FOLDER" >&2; exit 2; fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

# train.py's own parser and checks take its arguments now (names and values), not after the downloads.
$PY -c 'import sys; from vlcap import cli; cli.run(lambda: cli.check_arguments("train.py", sys.argv[1:], "run.sh", ["--smoke", "--source"]))' "$@"
if [ $smoke = 0 ] && ! $PY -c 'import sys, torch, train; sys.exit(train.read_settings(sys.argv[1:]).device != "cpu" and not torch.cuda.is_available())' "$@"; then
    echo "run.sh: error: no CUDA GPU is visible, and train.py needs one for Qwen2-VL-2B (nothing was downloaded); run it on a machine with a GPU, or try the whole pipeline offline on this CPU with: bash run.sh --smoke" >&2
    exit 2
fi

if [ $smoke = 1 ]; then
    S=${SMOKE_DIR:-smoke}  # where the smoke run writes everything
    export SWANLAB_MODE=${SWANLAB_MODE:-offline} SWANLAB_LOG_DIR=${SWANLAB_LOG_DIR:-$S/swanlog}
    $PY tools/make_offline_model.py --size tiny --out $S/model
    $PY tools/make_coco_folder.py --out $S/coco --n 132 --split train2014
    $PY tools/make_coco_folder.py --out $S/coco --n 24 --split val2014 --seed 1
    $PY data2csv.py --source $S/coco --n 132 --image-dir $S/coco_2014_caption --csv $S/coco-2014-dataset.csv
    $PY data2csv.py --source $S/coco --split validation --n 24 --image-dir $S/coco_2014_caption_val --csv $S/coco-2014-val.csv
    $PY csv2json.py --csv $S/coco-2014-dataset.csv --json $S/data_vl.json
    $PY csv2json.py --csv $S/coco-2014-val.csv --json $S/data_vl_eval.json
    $PY train.py --model-dir $S/model --data-json $S/data_vl.json --eval-json $S/data_vl_eval.json --output-dir $S/output \
        --overwrite --device cpu --image-size 56 --test-size 36 --max-steps 300 --batch-size 8 --learning-rate 3e-3 \
        --lora-r 16 --lora-dropout 0 --logging-steps 25 --sample-max-new-tokens 16 "$@"
    $PY infer.py --adapter $S/output/adapter --device cpu --output $S/captions.jsonl --overwrite
    exit
fi

$PY data2csv.py ${source[@]+"${source[@]}"}                           # the tutorial's 500 training pictures
$PY data2csv.py ${source[@]+"${source[@]}"} --split validation --n 100 --image-dir coco_2014_caption_val --csv coco-2014-val.csv
$PY csv2json.py                                          # -> data_vl.json
$PY csv2json.py --csv coco-2014-val.csv --json data_vl_eval.json
$PY train.py "$@"                                        # scores data_vl_eval.json before and after training
$PY infer.py --overwrite                                # the held-out pictures, afresh (a new adapter)
