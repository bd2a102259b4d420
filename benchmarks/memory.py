"""Peak resident memory of a command, for benchmarks/run.py.

The figure of record is the kernel's peak resident set size of the process (``ru_maxrss``), read with
``/usr/bin/time -v`` when that is GNU time, else with ``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper
interpreter (whose only child is the command). Peak RSS counts the pages of memory-mapped files the
process has touched as well as its own (anonymous) memory, so a sampler thread also reads
``/proc/PID/status`` of the command's process tree every few milliseconds and keeps the peaks of
``RssAnon`` (heap, tensors: memory the process needs) and ``RssFile`` (mapped file pages, which the kernel
can drop at any time): where a growth comes from is then visible. Linux only for the split; elsewhere
those two stay None.

    python benchmarks/memory.py COMMAND ...      # prints the peaks of one command
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

GNU_TIME = "/usr/bin/time"
SAMPLE_SECONDS = 0.02

# A fresh interpreter per measurement, so RUSAGE_CHILDREN holds exactly one child: the command.
RUSAGE_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def gnu_time() -> Optional[str]:
    """``/usr/bin/time`` when it is GNU time (understands ``-v`` and ``-o``), else None."""
    if not os.access(GNU_TIME, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.txt"
        try:
            probe = subprocess.run([GNU_TIME, "-v", "-o", str(report), "true"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        ok = probe.returncode == 0 and report.is_file() and "Maximum resident set size" in report.read_text()
    return GNU_TIME if ok else None


def tool_description(timer: Optional[str]) -> str:
    return f"`{timer} -v`" if timer else "`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a fresh wrapper process"


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in children:
                found.append(int(child))
                queue.append(int(child))
    return found


def _status_kb(pid: int) -> Optional[dict[str, int]]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


class _Sampler(threading.Thread):
    """Peaks of the summed RssAnon / RssFile over the descendants of ``root`` (the timer excluded)."""

    def __init__(self, root: int, include_root: bool):
        super().__init__(daemon=True)
        self.root, self.include_root = root, include_root
        self.stop = threading.Event()
        self.anon_kb: Optional[int] = None
        self.file_kb: Optional[int] = None

    def run(self) -> None:
        if not Path("/proc/self/status").is_file():
            return
        while not self.stop.is_set():
            pids = _descendants(self.root) + ([self.root] if self.include_root else [])
            statuses = [s for s in (_status_kb(pid) for pid in pids) if s and "RssAnon" in s]
            if statuses:
                anon = sum(s["RssAnon"] for s in statuses)
                mapped = sum(s.get("RssFile", 0) + s.get("RssShmem", 0) for s in statuses)
                self.anon_kb = max(self.anon_kb or 0, anon)
                self.file_kb = max(self.file_kb or 0, mapped)
            self.stop.wait(SAMPLE_SECONDS)


def measure(command: list[str], log: Path, timer: Optional[str], timeout: float = 4 * 3600) -> dict:
    """Run ``command`` (stdout and stderr to ``log``); raise on a non-zero exit.

    Returns ``peak_rss_mb`` (the figure of record), ``seconds`` (wall), and the sampled peaks
    ``anon_mb`` and ``file_mb`` (None where /proc is unavailable).
    """
    log = Path(log)
    report = log.with_suffix(".rss")
    if timer:
        wrapped = [timer, "-v", "-o", str(report), *command]
    else:
        wrapped = [sys.executable, "-c", RUSAGE_WRAPPER, str(report), *command]
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(wrapped, stdout=handle, stderr=subprocess.STDOUT)
        sampler = _Sampler(process.pid, include_root=False)
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            sampler.stop.set()
            sampler.join()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(command)} exited {code}: {' | '.join(tail)}")
    text = report.read_text()
    if timer:
        line = next(line for line in text.splitlines() if "Maximum resident set size" in line)
        kilobytes = int(line.rsplit(":", 1)[1])
    else:
        kilobytes = int(text)  # Linux reports ru_maxrss in kilobytes
    return {
        "peak_rss_mb": round(kilobytes / 1024, 1),
        "seconds": round(seconds, 1),
        "anon_mb": None if sampler.anon_kb is None else round(sampler.anon_kb / 1024, 1),
        "file_mb": None if sampler.file_kb is None else round(sampler.file_kb / 1024, 1),
    }


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    timer = gnu_time()
    with tempfile.TemporaryDirectory() as folder:
        result = measure(sys.argv[1:], Path(folder) / "command.log", timer)
        sys.stdout.write(Path(folder, "command.log").read_text(errors="replace"))
    print(f"peak RSS {result['peak_rss_mb']:.1f} MB ({tool_description(timer)}); sampled peaks: anonymous "
          f"{result['anon_mb']} MB, file-backed {result['file_mb']} MB; {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
