"""The allocator setting behind every model load: freed activations are reused, not re-faulted."""

import subprocess
import sys

import pytest

# Allocates and frees a 32 MB tensor 20 times; prints the page faults of the last 10.
PROBE = """
import resource, sys, torch
from shoprank.models.heap import keep_heap
if sys.argv[1] == "keep":
    assert keep_heap()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    torch.empty(8 << 20, dtype=torch.float32).fill_(1.0)
print(faults() - start)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_not_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    # 10 x 32 MB fresh pages by default is ~80,000 faults of 4 KiB; kept, almost none.
    assert default > 20_000, default
    assert kept < default / 20, (kept, default)
