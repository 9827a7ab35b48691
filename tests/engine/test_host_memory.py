"""keep_freed_memory: glibc's mallopt called with the mmap threshold before the trim threshold (the trim
threshold alone would pin the mmap threshold at 128 KiB: slower), and nothing claimed where it is refused."""

from __future__ import annotations

import platform

import pytest

from multiar.engine import host_memory


class FakeLibc:
    def __init__(self, answer: int) -> None:
        self.calls, self.answer = [], answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_the_mmap_threshold_is_set_first_then_the_trim_threshold(monkeypatch):
    libc = FakeLibc(1)
    monkeypatch.setattr(host_memory, "_libc", lambda: libc)
    assert host_memory.keep_freed_memory().startswith("blocks below 32 MiB from the heap")
    assert libc.calls == [(-3, 32 * 2**20), (-1, 2**31 - 1)]


def test_a_refused_setting_claims_nothing(monkeypatch):
    libc = FakeLibc(0)
    monkeypatch.setattr(host_memory, "_libc", lambda: libc)
    assert host_memory.keep_freed_memory() is None and libc.calls == [(-3, 32 * 2**20)]
    monkeypatch.setattr(host_memory, "_libc", lambda: None)  # not glibc
    assert host_memory.keep_freed_memory() is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_settings():
    assert host_memory.keep_freed_memory() is not None
