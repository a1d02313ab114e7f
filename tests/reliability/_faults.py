"""Helpers to inject faults from outside: find processes by their Ray title, wait for a
condition, run a job in a background thread."""
from __future__ import annotations

import os
import threading
import time

import psutil


def processes(fragment: str) -> list[psutil.Process]:
    """Live processes whose command line (Ray sets it to ``ray::<task or actor>``)
    contains ``fragment``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if fragment in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Background:
    """Run ``fn`` in a thread; ``join()`` returns its result or re-raises its error."""

    def __init__(self, fn):
        self.result, self.error = None, None

        def target():
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:.0f} s"
        return self.result
