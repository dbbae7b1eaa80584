"""The benchmark (`make bench`): the flow against Ray's own Slurm template and a bare
parallel start, measured in the same run, reported as ratios (BENCHMARKS.md)."""
