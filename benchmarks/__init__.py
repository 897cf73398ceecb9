"""Benchmarks: speed and memory figures of docs/benchmarks.md, apart from the user programs.

Run them from the repository root as modules, so that `cssr_dist` and the sibling
benchmarks import without any path patching, installed or not (the GPU image has the
checkout but not the package):

    python -m benchmarks.bench_head --quick
    python -m benchmarks.bench_data --quick
    python -m benchmarks.bench_metrics --quick
    python -m benchmarks.bench_train_step --quick
    bash tools/run_gpu_benchmarks.sh --rehearse     # benchmarks.bench_gpu, every GPU figure at once
"""
