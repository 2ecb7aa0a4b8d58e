#!/usr/bin/env bash
# GPU test suite in groups (each under its own timeout, so one hang cannot eat a whole device call),
# logging to ${OUT:-/tmp}/gpu_tests.log; exits non-zero if any group failed or timed out.
#   bash perf/sm90/run_gpu_suite.sh [group-name ...]   (default: all groups)
# Groups: fp8 (fp8 GEMM + fp8 layer), layer (decode kernel, layer, workspace, torch.compile, profile, disk cache),
#         gemm (bf16 grouped GEMM), routing (route, plan, route_and_plan, permute/combine).
set -u
log="${OUT:-/tmp}/gpu_tests.log"
declare -A groups=(
  [fp8]="tests/test_grouped_gemm_fp8_gpu.py tests/test_layer_fp8_gpu.py"
  [layer]="tests/test_decode_gpu.py tests/test_layer_gpu.py tests/test_workspace.py tests/test_compile.py tests/test_profile.py tests/test_disk_cache.py"
  [gemm]="tests/test_grouped_gemm_gpu.py"
  [routing]="tests/test_routing_gpu.py tests/test_plan_gpu.py tests/test_route_plan_gpu.py tests/test_permute_gpu.py"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(fp8 layer gemm routing)
status=0
t0=$(date +%s)
for name in "${names[@]}"; do
  files="${groups[$name]:?unknown group $name}"
  echo "=== $name ($(( $(date +%s) - t0 ))s)" | tee -a "$log"
  timeout "${GROUP_TIMEOUT:-240}" python -m pytest -m gpu $files -q -rfE -p no:cacheprovider -W ignore \
    > "$log.part" 2>&1
  rc=$?
  grep -v '^  \|^$' "$log.part" | tail -40 >> "$log"
  echo "rc=$rc" | tee -a "$log"
  tail -1 "$log.part"
  [ $rc -ne 0 ] && status=1
done
rm -f "$log.part"
exit $status
