#!/bin/bash
# A GPU user trial of the cuda backend in one device call: build, the suite on cuda, then the
# scripts here (each compares cuda with the cpu and with torch on the GPU; written on the cpu, first
# run on an H100 in the forty-second session). bash bench/gpu_trial/run.sh
export OUT=$OUT; WHEELS=.whl SKIP_TESTS=1 SKIP_BENCH=1 SKIP_LAYER_BENCH=1 SKIP_PROFILE=1 bash bench/gpu_run.sh > $OUT/build.log 2>&1
grep -E "build:|rror" $OUT/build.log
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
echo "== suite"; MPSCY_DEVICE=cuda timeout 200 python3 -m pytest tests -q -p no:cacheprovider > $OUT/suite.log 2>&1; echo "suite rc $?"; tail -1 $OUT/suite.log; grep -E "^(FAILED|ERROR)" $OUT/suite.log | head
T0=$(date +%s); el(){ echo $(( $(date +%s) - T0 )); }
r(){ echo "== $*"; timeout $1 env $3 python3 bench/gpu_trial/$2.py cuda 2>&1; echo "rc=$? t=$(el)"; }
{ r 40 t4_err; r 30 t7_oom; } > $OUT/seq.log
mkdir -p /tmp/pl; for j in t1_fit t2_ckpt t3_io t5_layers t6_misc t9_threads t10_bigconv; do r 90 $j X=1 > /tmp/pl/$j.log & done; wait
cat /tmp/pl/*.log > $OUT/par.log; echo "trial done $(el)s"
grep -h -E "^(FAIL|EXC|SUMMARY|== |rc=)|Traceback|Fatal|Segmentation" $OUT/seq.log $OUT/par.log | cut -c1-260
