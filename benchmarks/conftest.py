"""Benchmarks are not tests: the files here are collected only by `pytest benchmarks --benchmark-only`
(pytest-benchmark), never by a plain `pytest` run (pyproject's testpaths is tests/ anyway)."""


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        try:
            benchmark_only = config.getoption("benchmark_only")
        except ValueError:  # pytest-benchmark is not installed
            benchmark_only = False
        if not benchmark_only:
            return True
    return None
