source .devrun/setup.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name --format=csv,noheader > /tmp/o/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/engine/test_graph_decode.py > /tmp/o/tests.log 2>&1; echo rc=$? >> /tmp/o/tests.log
tail -15 /tmp/o/tests.log
[ -d /tmp/m06 ] || .devrun/kv make-model --arch qwen3 --size 0.6b --init-device cuda /tmp/m06 > /tmp/o/make.log 2>&1
[ -d /tmp/m8 ] || .devrun/kv make-model --arch qwen3 --size 8b --init-device cuda /tmp/m8 >> /tmp/o/make.log 2>&1
timeout 150 python3 .devrun/gpu_decode2.py /tmp/m8 2048,16384 /tmp/o/dec8.json > /tmp/o/dec8.log 2>&1; echo rc=$? >> /tmp/o/dec8.log
timeout 60 python3 .devrun/gpu_decode2.py /tmp/m06 2048 /tmp/o/dec06.json > /tmp/o/dec06.log 2>&1; echo rc=$? >> /tmp/o/dec06.log
grep -v Loading /tmp/o/dec8.log /tmp/o/dec06.log | tail -14
tar czf $OUT/o3.tgz -C /tmp o
