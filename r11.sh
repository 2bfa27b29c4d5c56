python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.extra || exit 1
python3 -m compileall -q -j 16 /tmp/site /opt/torch/.venv/lib/python3.12/site-packages > /dev/null 2>&1
export PYTHONUNBUFFERED=1 W=$PWD/bench/work
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
python bench/bench.py --prepare-only > /dev/null 2>&1; python -c "import sys; sys.path[:0]=['bench']; from bench import prepare_eval; from pathlib import Path; prepare_eval(Path('bench/work'))"
python train.py --model-dir $W/model-qwen2_vl --data-json $W/data-500/data_vl.json --eval-json $W/eval-100/data_vl_eval.json --overwrite --swanlab-mode disabled --output-dir $W/out > $OUT/train.log 2>&1; echo "rc $?"
grep -ac "Warning" $OUT/train.log | sed 's/^/warning lines: /'; grep -a "^time:\|^trained\|quality after" $OUT/train.log
python bench/bench.py --variants fast --results $OUT/results.md > $W/bench-fast.log 2>&1 || tail -30 $W/bench-fast.log
grep -a "captions equal\|^| fast\|^| generate" $OUT/results.md
