import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge import host_memory
from gptforge.training import trainer

# A child process (the setting is for the whole process): malloc 64 MB, touch every page, free it, four
# times; prints the minor page faults of each round (a 4 KB page faulted in from the kernel is one).
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from gptforge.host_memory import keep_freed_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 * 2**20)
        ctypes.memset(block, 1, 64 * 2**20)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(*[faults() for _ in range(4)])
""")


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return [int(n) for n in out.split()]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_blocks_are_reused_without_fresh_pages():
    """By default glibc unmaps a freed 64 MB block, so each round faults its 16,384 pages in again; once
    keep_freed_memory() has run, the rounds after the first reuse the block's pages."""
    pages = 64 * 2**20 // 4096
    default, kept = _faults("default"), _faults("keep")
    assert all(n > pages // 2 for n in default)
    assert kept[0] > pages // 2 and all(n < pages // 100 for n in kept[1:])


def test_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    host_memory.keep_freed_memory.cache_clear()
    try:
        assert host_memory.keep_freed_memory() is False
    finally:
        host_memory.keep_freed_memory.cache_clear()


@pytest.mark.parametrize("device, expected", [("cpu", 1), ("meta", 0)])
def test_training_on_a_cpu_sets_it(monkeypatch, device, expected):
    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1))
    trainer._configure_torch(torch.device(device), deterministic=False)
    assert len(calls) == expected
