import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py
# DeepSpeed's JIT ops cached per virtual environment (as `make` does), inherited by spawned ranks
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# Where DeepSpeed is not installed (the GPU machine's image runs the CUDA tests without it), a test or test
# module that fails only because `import deepspeed` does is reported skipped, not failed or as a collection error.
_DEEPSPEED_MISSING = ("No module named 'deepspeed", "import of deepspeed halted")


@functools.cache
def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _skip_without_deepspeed(report):
    if report.failed and any(m in str(report.longrepr) for m in _DEEPSPEED_MISSING) and not _deepspeed_importable():
        report.outcome = "skipped"
        report.longrepr = (str(report.fspath), 0, "Skipped: needs DeepSpeed, which is not installed")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _skip_without_deepspeed((yield))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _skip_without_deepspeed((yield))
