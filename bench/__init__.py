"""The benchmark suite of issue 6 (see the README, Performance)."""
