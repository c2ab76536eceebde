#!/usr/bin/env python3
"""Summarises `perf script --show-task-events -F pid,tid,comm,ip,sym,dso` output of a system-wide `perf record -g`
into where each jobz process kind spends its CPU (bench/profile.sh runs it).

Per process kind: its share of all busy samples, kernel vs user, the system calls its
kernel time is spent in (the first `sys_*` frame of each kernel call chain; page faults and
interrupts named as such), and its hottest user symbols and libraries (leaf frames only:
release builds have no frame pointers, so deeper user frames are not trusted).
"""

import collections
import re
import sys

HEADER = re.compile(r"^(?P<comm>\S.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s*$")
FRAME = re.compile(r"^\s+(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")
COMM_EVENT = re.compile(r"PERF_RECORD_COMM(?: exec)?: (?P<name>.+?):(?P<pid>\d+)/(?P<tid>\d+)")
SYSCALL = re.compile(r"^(?:__x64_sys_|__do_sys_|__se_sys_|ksys_|__ia32_sys_)(\w+?)(?:\+0x[0-9a-f]+)?$")
KERNEL = "[kernel.kallsyms]"

# Shell children first: a forked child runs as `jobz-step` until it execs `sh`.
KINDS = [
    ("broker", ("jobz-broker",)),
    ("frontend", ("jobz-frontend",)),
    ("worker", ("jobz-worker",)),
    ("step supervisor", ("jobz-step",)),
    ("semaphore", ("jobz-semaphore",)),
    ("bench (load generator)", ("bench",)),
]
SHELLS = ("sh", "dash", "bash", "true")


def parse(lines, names):
    """Yields (pid, tid, comm, frames) per sample; frames are (sym, dso), leaf first. Fills
    `names` with each process's name (its main thread's last `comm`, from task events)."""
    sample = None
    for line in lines:
        event = COMM_EVENT.search(line)
        if event:
            if event["pid"] == event["tid"]:
                names[int(event["pid"])] = event["name"]
            continue
        line = line.rstrip("\n")
        if not line.strip():
            if sample:
                yield sample
            sample = None
            continue
        if sample is None:
            m = HEADER.match(line)
            if m:
                sample = (int(m["pid"]), int(m["tid"]), m["comm"], [])
            continue
        m = FRAME.match(line)
        if m:
            sample[3].append((m["sym"], m["dso"]))
    if sample:
        yield sample


def kernel_bucket(frames):
    """What a kernel sample was doing: the system call, or a page fault / interrupt."""
    names = [sym for sym, dso in frames if dso == KERNEL]
    for sym in names:
        m = SYSCALL.match(sym)
        if m:
            return "syscall " + m.group(1)
    joined = " ".join(names)
    if "exc_page_fault" in joined:
        return "page fault"
    if "ret_from_fork" in joined:
        return "new process/thread start"
    if "irq" in joined or "softirq" in joined or "sysvec" in joined:
        return "interrupts/softirq"
    return "other kernel: " + (names[0] if names else "?")


def main(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        main_comm = {}
        samples = list(parse(f, main_comm))
    # A process's name is its main thread's; a pid that ever ran a shell is a step's child.
    shells = set()
    for pid, tid, comm, _ in samples:
        if pid == tid:
            main_comm.setdefault(pid, comm)
        if comm in SHELLS or main_comm.get(pid) in SHELLS:
            shells.add(pid)

    def kind_of(pid, comm):
        if pid in shells:
            return "step shells (fork, exec, sh)"
        for name in (comm, main_comm.get(pid, "")):
            for kind, prefixes in KINDS:
                if name.startswith(prefixes):
                    return kind
        return None

    by_kind = collections.defaultdict(list)
    idle = other = 0
    for pid, tid, comm, frames in samples:
        if pid == 0 or comm == "swapper":
            idle += 1
            continue
        kind = kind_of(pid, comm)
        if kind is None:
            other += 1
            continue
        by_kind[kind].append(frames)

    mesh = sum(len(v) for v in by_kind.values())
    total = mesh + other + idle
    print(f"samples: {total} ({idle} idle, {other} in processes outside the bench, {mesh} in its processes)")
    print()
    print(f"{'process kind':32} {'share':>8} {'kernel':>8}")
    ordered = sorted(by_kind.items(), key=lambda kv: -len(kv[1]))
    for kind, frames_list in ordered:
        kernel = sum(1 for fr in frames_list if fr and fr[0][1] == KERNEL)
        print(f"{kind:32} {100 * len(frames_list) / mesh:7.1f}% {100 * kernel / len(frames_list):7.0f}%")
    for kind, frames_list in ordered:
        n = len(frames_list)
        kernel = collections.Counter()
        user = collections.Counter()
        dsos = collections.Counter()
        for frames in frames_list:
            if not frames:
                continue
            sym, dso = frames[0]
            dsos[short_dso(dso)] += 1
            if dso == KERNEL:
                kernel[kernel_bucket(frames)] += 1
            else:
                user[f"{sym} ({short_dso(dso)})"] += 1
        print()
        print(f"== {kind}: {n} samples")
        print("   libraries: " + ", ".join(f"{d} {100 * c / n:.0f}%" for d, c in dsos.most_common(6)))
        print("   kernel time by what it served (share of this kind):")
        for name, c in kernel.most_common(12):
            print(f"     {100 * c / n:5.1f}%  {name}")
        print("   hottest user symbols (leaf, share of this kind):")
        for name, c in user.most_common(12):
            print(f"     {100 * c / n:5.1f}%  {name[:110]}")


def short_dso(dso):
    if dso == KERNEL:
        return "kernel"
    return dso.rsplit("/", 1)[-1] or dso


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: profile_report.py SAMPLES.txt (perf script --show-task-events -F pid,tid,comm,ip,sym,dso)")
    main(sys.argv[1])
