"""Benchmarks of vitexp's training step and data path; each module runs as a script
(`python benchmarks/NAME.py --help`) and exposes `run(...) -> dict` for the tests."""
