#!/usr/bin/env bash
# The whole pipeline, in order. Extra arguments go to train.py.
#
#   bash run.sh                      # COCO 2014 from ModelScope -> CSV -> JSON -> LoRA fine-tune on the GPU -> captions
#   bash run.sh --smoke              # the same steps offline on a CPU: tiny model, generated pictures, under a minute
#   bash run.sh --epochs 1           # any train.py flag
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

if [ "${1:-}" = "--smoke" ]; then
    shift
    S=${SMOKE_DIR:-smoke}  # where the smoke run writes everything
    export SWANLAB_MODE=${SWANLAB_MODE:-offline}
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
    $PY infer.py --adapter $S/output/adapter --device cpu --output $S/captions.jsonl
    exit
fi

$PY data2csv.py                                          # the tutorial's 500 training pictures
$PY data2csv.py --split validation --n 100 --image-dir coco_2014_caption_val --csv coco-2014-val.csv
$PY csv2json.py                                          # -> data_vl.json
$PY csv2json.py --csv coco-2014-val.csv --json data_vl_eval.json
$PY train.py "$@"                                        # scores data_vl_eval.json before and after training
$PY infer.py
