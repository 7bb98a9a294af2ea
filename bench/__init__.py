"""Benchmarks: `python -m bench.<name>`; results land in bench/results/ (JSON with machine info)."""
