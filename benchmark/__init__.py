"""The tools behind docs/results.md: source-model pre-training, the three benchmarks, evaluation, the
chain-of-forgetting analysis, the demo and the GPU check. Each runs from the repository root as
``python -m benchmark.<tool>``; ``benchmark.runner`` holds what the benchmarks share."""
