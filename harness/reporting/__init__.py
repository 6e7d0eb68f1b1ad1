"""What becomes of runs: the typed run record and runs.parquet, leaderboards and their statistics,
paper claims and published numbers, the rendered reports, lm-eval interop."""
