"""The benchmark apps, as their users would write them, in every variant ``benchmarks.server`` compares."""
