import os

# Tests never reach a model hub (pytest.ini puts the repo root and tests/ on the import path).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The fault-injection sweep (tests/test_faults.py): `make test` runs its short form; the trials marked
# faults_full run only when asked for: `make test-faults` (FAULTS_FULL=1 pytest tests/test_faults.py, all
# trials) or `pytest -m faults_full` (the extra trials alone).
def pytest_configure(config):
    config.fault_table = {}


def pytest_collection_modifyitems(config, items):
    import pytest

    markexpr = config.getoption("markexpr") or ""
    if "slow" not in markexpr:  # the measurement sweeps: pytest -m slow
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="long sweep: pytest -m slow"))
    if os.environ.get("FAULTS_FULL") == "1" or "faults_full" in markexpr:
        return
    skip = pytest.mark.skip(reason="full fault sweep: make test-faults")
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    """The fault table: class -> outcome -> trials, from the trials that ran."""
    table = getattr(config, "fault_table", {})
    if not table:
        return
    terminalreporter.section("faults, counted")
    for fault, outcomes in sorted(table.items()):
        total = sum(outcomes.values())
        terminalreporter.write_line(f"{fault:<48} {total:>4} trials: " +
                                    ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
