#!/usr/bin/env python3
"""fio side by side: the raw file, nbdkit's file plugin, ironhorn with 1 and 3 replicas.

Run through benches/fio_compare.sh (which builds the release binary first). Everything it
starts (nbdkit, replicas, engines) runs under a scratch directory and is stopped when it
exits, however it exits. It writes its section of benches/RESULTS.md (between the
`<!-- fio-compare:begin -->` / `<!-- fio-compare:end -->` markers) and leaves the rest of that
file alone. How to read the output: benches/README.md.

Settings (environment):
  FIO_COMPARE_DIR      parent of the scratch directory (default /tmp); all targets' files
                       live in one scratch directory on that file system
  FIO_COMPARE_KEEP     1 keeps the scratch directory (logs, fio JSON) afterwards
  FIO_RUNTIME          seconds per fio run (default 4)
  FIO_REPS             runs per job and target; medians are reported (default 3)
  FIO_SIZE             volume / file size (default 1GiB); filled fully before the runs
  FIO_FRESH_SIZE       size of the fresh volumes for the fresh-space write jobs (default 8GiB,
                       sparse; large so that a run never writes the same block twice)
  FIO_FRESH            0 skips the fresh-space jobs
  FIO_TARGETS          comma list of raw,nbdkit,ih1,ih3 (default all)
  FIO_JOBS             comma list of job ids (default all; see JOBS below)
  FIO_TRANSPORT        unix (default) or tcp: how fio reaches nbdkit and the engine
  IRONHORN_BIN         ironhorn binary (default target/release/ironhorn); copied into the
                       scratch directory so a rebuild during the run changes nothing
  FIO_RESULTS          markdown file to update (default benches/RESULTS.md); '-' prints only
  FIO_COMPARE_COMMIT   what to record as the commit when IRONHORN_BIN was built from another
                       tree than this one (default: this tree's HEAD and its changed files)
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- fio-compare:begin -->"
END = "<!-- fio-compare:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def env(name: str, default: str) -> str:
    v = os.environ.get(name, "")
    return v if v else default


def parse_size(s: str) -> int:
    s = s.strip()
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
             "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


RUNTIME = int(env("FIO_RUNTIME", "4"))
REPS = int(env("FIO_REPS", "3"))
SIZE = parse_size(env("FIO_SIZE", "1GiB"))
FRESH_SIZE = parse_size(env("FIO_FRESH_SIZE", "8GiB"))
DO_FRESH = env("FIO_FRESH", "1") != "0"
TRANSPORT = env("FIO_TRANSPORT", "unix")
KEEP = env("FIO_COMPARE_KEEP", "0") == "1"
RESULTS = env("FIO_RESULTS", str(REPO / "benches" / "RESULTS.md"))
IRONHORN_BIN = Path(env("IRONHORN_BIN", str(REPO / "target" / "release" / "ironhorn")))
VOLUME = "vol"

# ---------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    id: str
    title: str
    rw: str
    bs: str
    qd: int
    fsync: bool = False
    fresh: bool = False

    @property
    def ddir(self) -> str:
        return "read" if self.rw in ("read", "randread") else "write"


JOBS = [
    Job("randread-4k-qd32", "4k randread qd32", "randread", "4k", 32),
    Job("randwrite-4k-qd32", "4k randwrite qd32", "randwrite", "4k", 32),
    Job("randwrite-4k-qd1", "4k randwrite qd1", "randwrite", "4k", 1),
    Job("write-flush-4k-qd1", "4k randwrite+flush qd1", "randwrite", "4k", 1, fsync=True),
    Job("seqread-1m-qd8", "1M seq read qd8", "read", "1M", 8),
    Job("seqwrite-1m-qd8", "1M seq write qd8", "write", "1M", 8),
]
# In this order: the flush job leaves nothing dirty, and the files are deleted after the last.
FRESH_JOBS = [
    Job("fresh-write-flush-4k-qd1", "4k randwrite+flush qd1, fresh", "randwrite", "4k", 1,
        fsync=True, fresh=True),
    Job("fresh-randwrite-4k-qd32", "4k randwrite qd32, fresh", "randwrite", "4k", 32, fresh=True),
]

# The targets: (job, metric, 1-replica bound, 3-replica bound). For "iops" and "bw"
# the bound is the least ratio to nbdkit; for "p50" the greatest.
GOALS = [
    ("randread-4k-qd32", "iops", 0.75, 0.6),
    ("randwrite-4k-qd32", "iops", 0.75, 0.3),
    ("randwrite-4k-qd1", "p50", 1.5, 2.5),
    ("write-flush-4k-qd1", "iops", 0.75, 0.6),
    ("seqread-1m-qd8", "bw", 0.75, 0.5),
    ("seqwrite-1m-qd8", "bw", 0.75, 0.3),
]

TARGET_TITLES = {
    "raw": "raw file",
    "nbdkit": "nbdkit file",
    "ih1": "ironhorn 1 replica",
    "ih3": "ironhorn 3 replicas",
}

# ---------------------------------------------------------------------------------------
# Processes: every child dies with us (PR_SET_PDEATHSIG) and is stopped at exit.

_children: list[subprocess.Popen] = []


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "ab")
    p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         preexec_fn=_die_with_parent)
    f.close()
    _children.append(p)
    return p


def stop(procs: list[subprocess.Popen], kill: bool = False) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p in _children:
            _children.remove(p)


def stop_all() -> None:
    stop(list(reversed(_children)))


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)


def free_port(pair: bool = False) -> int:
    """A free 127.0.0.1 port (with the next one free too when `pair`)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not pair:
                return port
            if port >= 65535:
                continue
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def wait_until(what: str, cond, procs: list[subprocess.Popen], logs: list[Path],
               timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[0]} exited with {p.returncode}; "
                                   f"log {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; logs: {', '.join(map(str, logs))}")
        time.sleep(0.05)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def can_connect_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def can_connect_unix(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            return True
    except OSError:
        return False


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def ctx_switches(pid: int) -> tuple[int, frozenset]:
    """Voluntary + involuntary context switches summed over the process's threads, and the
    thread ids (a thread that exits takes its count with it: nbdkit's per-connection ones)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, frozenset()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total, frozenset(tids)


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)


# ---------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    key: str
    scratch: Path
    size: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    # Server processes whose CPU is counted, by role.
    roles: dict[str, list[int]] = field(default_factory=dict)
    uri: str = ""
    file: Path | None = None

    def fio_target_args(self) -> list[str]:
        if self.key == "raw":
            return ["--ioengine=io_uring", "--direct=1", f"--filename={self.file}",
                    f"--size={self.size}"]
        return ["--ioengine=nbd", f"--uri={self.uri}"]

    def settle(self) -> None:
        """fsyncs this target's files (not `sync`: that would wait for the whole machine)."""
        for path in self.scratch.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # gone meanwhile (a temp metadata file)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def stop(self, kill: bool = False) -> None:
        stop(list(reversed(self.procs)), kill)
        self.procs = []


class Bench:
    def __init__(self, scratch: Path, ironhorn: Path):
        self.scratch = scratch
        self.ironhorn = ironhorn
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.fio_out = scratch / "fio"
        self.fio_out.mkdir(exist_ok=True)
        self.seq = 0
        # Targets whose files are fsynced before every run.
        self.live: list[Target] = []

    # -- starting targets ---------------------------------------------------------------

    def start(self, key: str, name: str, size: int, fresh: bool) -> Target:
        d = self.scratch / name
        d.mkdir(parents=True, exist_ok=True)
        t = Target(key, d, size)
        if key == "raw":
            t.file = d / "raw.img"
            # Preallocated: blocks reserved (unwritten extents) up front.
            with open(t.file, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        elif key == "nbdkit":
            t.file = d / "nbdkit.img"
            # Sparse, like an ironhorn replica's layer file.
            with open(t.file, "wb") as f:
                f.truncate(size)
            log = self.logs / f"{name}-nbdkit.log"
            if TRANSPORT == "unix":
                sock = d / "nbdkit.sock"
                p = spawn(["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                           "file", str(t.file)], log)
                t.uri = f"nbd+unix:///?socket={sock}"
                ready = lambda: can_connect_unix(sock)  # noqa: E731
            else:
                port = free_port()
                p = spawn(["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1",
                           "-p", str(port), "file", str(t.file)], log)
                t.uri = f"nbd://127.0.0.1:{port}/"
                ready = lambda: can_connect_tcp(port)  # noqa: E731
            t.procs.append(p)
            t.roles["nbdkit"] = [p.pid]
            wait_until(f"nbdkit ({name})", ready, [p], [log])
        else:
            n = 1 if key == "ih1" else 3
            replicas = []
            for i in range(n):
                port = free_port(pair=True)
                log = self.logs / f"{name}-replica{i}.log"
                p = spawn([str(self.ironhorn), "replica", "serve", "--dir", str(d / f"r{i}"),
                           "--size", str(size), "--listen", f"127.0.0.1:{port}"], log)
                t.procs.append(p)
                replicas.append((port, p, log))
            for port, p, log in replicas:
                wait_until(f"replica on {port} ({name})",
                           lambda: can_connect_tcp(port) and can_connect_tcp(port + 1), [p], [log])
            control = free_port()
            args = [str(self.ironhorn), "engine", "serve", "--volume", VOLUME, "--size", str(size),
                    "--listen", f"127.0.0.1:{control}"]
            for port, _, _ in replicas:
                args += ["--replica", f"127.0.0.1:{port}"]
            if TRANSPORT == "unix":
                sock = d / "engine.sock"
                args += ["--nbd", f"unix://{sock}"]
                t.uri = f"nbd+unix:///{VOLUME}?socket={sock}"
                ready = lambda: can_connect_unix(sock)  # noqa: E731
            else:
                nbd_port = free_port()
                args += ["--nbd", f"tcp://127.0.0.1:{nbd_port}"]
                t.uri = f"nbd://127.0.0.1:{nbd_port}/{VOLUME}"
                ready = lambda: can_connect_tcp(nbd_port)  # noqa: E731
            log = self.logs / f"{name}-engine.log"
            e = spawn(args, log)
            t.procs.append(e)
            wait_until(f"engine ({name})", ready, t.procs, [r[2] for r in replicas] + [log])
            t.roles["engine"] = [e.pid]
            t.roles["replicas"] = [p.pid for _, p, _ in replicas]
        if t.uri:
            got = int(run(["nbdinfo", "--size", t.uri]).stdout.strip())
            if got != size:
                raise RuntimeError(f"{name}: export size {got}, expected {size}")
        return t

    def fill(self, t: Target) -> float:
        """Writes the whole volume once (1M sequential writes); returns the seconds it took."""
        t0 = time.monotonic()
        self.fio(t, ["--name=fill", "--rw=write", "--bs=1M", "--iodepth=8", f"--size={t.size}"],
                 "fill")
        return time.monotonic() - t0

    # -- fio ------------------------------------------------------------------------------

    def fio(self, t: Target, extra: list[str], label: str) -> dict:
        self.seq += 1
        out = self.fio_out / f"{self.seq:03d}-{t.key}-{label}.json"
        args = ["fio", "--output-format=json", f"--output={out}", "--lat_percentiles=1",
                "--percentile_list=50:99", "--randrepeat=0", *t.fio_target_args(), *extra]
        r = subprocess.run(args, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"fio failed ({' '.join(args)}):\n{r.stdout}\n{r.stderr}")
        j = json.loads(out.read_text())["jobs"][0]
        if j.get("error"):
            raise RuntimeError(f"fio job error {j['error']} ({' '.join(args)})")
        return j

    def run_job(self, t: Target, job: Job, offset: int = 0, size: int | None = None) -> dict:
        extra = [f"--name={job.id}", f"--rw={job.rw}", f"--bs={job.bs}",
                 f"--iodepth={job.qd}", "--time_based", f"--runtime={RUNTIME}"]
        if job.fsync:
            # After every write an fsync: io_uring's IORING_OP_FSYNC on the raw file,
            # NBD_CMD_FLUSH through fio's nbd engine (which maps only fsync, not fdatasync).
            extra.append("--fsync=1")
        if offset or size is not None:
            extra += [f"--offset={offset}", f"--size={size}"]
        pids = [p for ps in t.roles.values() for p in ps]
        # Start every run with none of the targets' data dirty in the page cache: otherwise
        # the first flush of a `+flush` run pays for everything the runs before it left, and
        # writeback of one target's data lands in another's run.
        for other in self.live or [t]:
            other.settle()
        load = loadavg()
        before = {role: sum(cpu_ticks(p) for p in ps) for role, ps in t.roles.items()}
        cs_before = [ctx_switches(p) for p in pids]
        j = self.fio(t, extra, job.id)
        after = {role: sum(cpu_ticks(p) for p in ps) for role, ps in t.roles.items()}
        cs_after = [ctx_switches(p) for p in pids]
        # nbdkit starts a thread per connection and ends it at disconnect, so before and
        # after both miss it: its switches cannot be counted this way.
        same_threads = t.key != "nbdkit" and all(a[1] == b[1]
                                                  for a, b in zip(cs_before, cs_after))
        d = j[job.ddir]
        pct = d["lat_ns"].get("percentile", {})
        res = {
            "target": t.key, "job": job.id, "load1": load,
            "iops": d["iops"], "bw": d["bw_bytes"], "bytes": d["io_bytes"],
            "ios": d["total_ios"],
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "cpu_s": {role: (after[role] - before[role]) / CLK_TCK for role in after},
            "ctxsw": (sum(a[0] for a in cs_after) - sum(b[0] for b in cs_before)
                      if same_threads else None),
            "fio_cpu_pct": j["usr_cpu"] + j["sys_cpu"],
        }
        if job.fsync:
            spct = j["sync"]["lat_ns"].get("percentile", {})
            res["flush_p50_us"] = spct.get("50.000000", 0) / 1000
            res["flush_p99_us"] = spct.get("99.000000", 0) / 1000
        return res


# ---------------------------------------------------------------------------------------
# Summaries


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> dict:
    """Medians over the runs of one (target, job)."""
    s = {k: med([r[k] for r in runs]) for k in ("iops", "bw", "p50_us", "p99_us")}
    s["iops_min"] = min(r["iops"] for r in runs)
    s["iops_max"] = max(r["iops"] for r in runs)
    for k in ("flush_p50_us", "flush_p99_us"):
        if k in runs[0]:
            s[k] = med([r[k] for r in runs])
    if runs[0]["cpu_s"]:
        per_gib, per_op, roles = [], [], {}
        for r in runs:
            cpu = sum(r["cpu_s"].values())
            per_gib.append(cpu / (r["bytes"] / GIB) if r["bytes"] else float("nan"))
            per_op.append(cpu / r["ios"] * 1e6 if r["ios"] else float("nan"))
            for role, v in r["cpu_s"].items():
                roles.setdefault(role, []).append(v / r["ios"] * 1e6 if r["ios"] else 0)
        s["cpu_s_per_gib"] = med(per_gib)
        s["cpu_us_per_op"] = med(per_op)
        s["cpu_us_per_op_roles"] = {role: med(v) for role, v in roles.items()}
        cs = [r["ctxsw"] / r["ios"] for r in runs if r["ctxsw"] is not None and r["ios"]]
        if cs:
            s["ctxsw_per_op"] = med(cs)
    return s


def fmt_num(x: float) -> str:
    if x != x:  # nan
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}"


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def results_table(jobs: list[Job], summary: dict, targets: list[str]) -> list[str]:
    lines = [
        "| job | target | IOPS (min–max) | MB/s | p50 µs | p99 µs | ×raw | ×nbdkit | "
        "server CPU s/GiB | server CPU µs/op | ctx sw/op |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for job in jobs:
        for key in targets:
            s = summary.get((key, job.id))
            if not s:
                continue
            # Throughput ratio: IOPS (bandwidth for 1M jobs is the same ratio).
            r_raw = ratio(s, summary.get(("raw", job.id)), "iops")
            r_nbd = ratio(s, summary.get(("nbdkit", job.id)), "iops")
            lat = f"{fmt_num(s['p50_us'])} | {fmt_num(s['p99_us'])}"
            if "flush_p50_us" in s:
                lat = (f"{fmt_num(s['p50_us'])} (flush {fmt_num(s['flush_p50_us'])}) | "
                       f"{fmt_num(s['p99_us'])} (flush {fmt_num(s['flush_p99_us'])})")
            if "cpu_s_per_gib" not in s:
                cpu_gib = "–"
            elif job.ddir == "write":
                cpu_gib = fmt_num(s["cpu_s_per_gib"])
            else:
                cpu_gib = f"({fmt_num(s['cpu_s_per_gib'])})"
            if "cpu_us_per_op_roles" in s and len(s["cpu_us_per_op_roles"]) > 1:
                roles = s["cpu_us_per_op_roles"]
                cpu_op = (f"{fmt_num(s['cpu_us_per_op'])} (e {fmt_num(roles.get('engine', 0))}"
                          f" + r {fmt_num(roles.get('replicas', 0))})")
            else:
                cpu_op = fmt_num(s.get("cpu_us_per_op", float("nan")))
            cs = fmt_num(s["ctxsw_per_op"]) if "ctxsw_per_op" in s else "–"
            lines.append(
                f"| {job.title} | {TARGET_TITLES[key]} | {fmt_num(s['iops'])} "
                f"({fmt_num(s['iops_min'])}–{fmt_num(s['iops_max'])}) | {fmt_num(s['bw'] / 1e6)} | "
                f"{lat} | {fmt_ratio(r_raw)} | {fmt_ratio(r_nbd)} | {cpu_gib} | {cpu_op} | {cs} |")
    return lines


def goals_table(summary: dict) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    titles = {j.id: j.title for j in JOBS}
    lines = [
        "| goal (ratio to nbdkit) | 1 replica: goal | measured | met? | 3 replicas: goal | "
        "measured | met? |",
        "| --- | ---: | ---: | :---: | ---: | ---: | :---: |",
    ]
    verdicts = []
    for job_id, metric, g1, g3 in GOALS:
        nbd = summary.get(("nbdkit", job_id))
        cells = []
        for key, goal in (("ih1", g1), ("ih3", g3)):
            s = summary.get((key, job_id))
            if metric == "p50":
                r = ratio(s, nbd, "p50_us")
                ok = None if r is None else r <= goal
                want = f"≤ {goal}×"
            else:
                r = ratio(s, nbd, metric)
                ok = None if r is None else r >= goal
                want = f"≥ {goal}"
            mark = "–" if ok is None else ("met" if ok else "**not met**")
            cells += [want, fmt_ratio(r), mark]
            verdicts.append((job_id, key, ok))
        what = titles[job_id] + {"iops": " IOPS", "bw": " MB/s", "p50": " p50 latency"}[metric]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines, verdicts


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], text=True, capture_output=True,
                              check=True).stdout.rstrip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def machine() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "model": model, "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}


def fs_of(path: Path) -> str:
    try:
        out = run(["df", "--output=fstype,source", str(path)]).stdout.splitlines()[1].split()
        return f"{out[0]} on {out[1]}"
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        return "?"


def version(args: list[str]) -> str:
    try:
        r = subprocess.run(args, text=True, capture_output=True)
        return (r.stdout or r.stderr).splitlines()[0].strip()
    except (OSError, IndexError):
        return "?"


def uptime() -> str:
    return version(["uptime"])


def write_section(text: str) -> None:
    if RESULTS == "-":
        print(text)
        return
    path = Path(RESULTS)
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        _, tail_ = rest.split(END, 1)
        new = head + block + tail_
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------


def main() -> int:
    targets = [t for t in env("FIO_TARGETS", "raw,nbdkit,ih1,ih3").split(",") if t]
    for t in targets:
        if t not in TARGET_TITLES:
            raise SystemExit(f"unknown target {t!r} (raw, nbdkit, ih1, ih3)")
    if TRANSPORT not in ("unix", "tcp"):
        raise SystemExit("FIO_TRANSPORT must be unix or tcp")
    only = [j for j in env("FIO_JOBS", "").split(",") if j]
    jobs = [j for j in JOBS if not only or j.id in only]
    fresh_jobs = [j for j in FRESH_JOBS if DO_FRESH and (not only or j.id in only)]
    uses_ih = any(t.startswith("ih") for t in targets)
    if uses_ih and not IRONHORN_BIN.exists():
        raise SystemExit(f"{IRONHORN_BIN} not found: run cargo build --release")

    parent = Path(env("FIO_COMPARE_DIR", "/tmp"))
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ironhorn-fio-", dir=parent))
    need = SIZE * (1 + ("nbdkit" in targets) + 4 * uses_ih) * 1.1
    free = shutil.disk_usage(scratch).free
    if free < need:
        raise SystemExit(f"{scratch}: {free / GIB:.1f} GiB free, need about {need / GIB:.1f}")
    if not KEEP:
        atexit.register(shutil.rmtree, scratch, True)
    # atexit runs last-registered first: processes are stopped before the rmtree.
    atexit.register(stop_all)

    ironhorn = scratch / "ironhorn"
    bin_sha = ""
    if uses_ih:
        shutil.copy2(IRONHORN_BIN, ironhorn)
        bin_sha = hashlib.sha256(ironhorn.read_bytes()).hexdigest()[:12]
    bench = Bench(scratch, ironhorn)

    started = datetime.datetime.now(datetime.timezone.utc)
    up_start = uptime()
    print(f"scratch {scratch} ({fs_of(scratch)}); {up_start}", flush=True)
    n_runs = REPS * (len(jobs) * len(targets) + len(fresh_jobs) * len(targets))
    print(f"{n_runs} fio runs of {RUNTIME}s over {len(targets)} targets", flush=True)

    # Written-space runs: all targets up at once, filled, then for each repetition every job
    # on every target back to back (target order rotates), so that load changes on this
    # shared machine hit all targets alike.
    live: dict[str, Target] = {}
    fill_s: dict[str, float] = {}
    runs: list[dict] = []
    for key in targets:
        live[key] = bench.start(key, key, SIZE, fresh=False)
        bench.live.append(live[key])
        fill_s[key] = bench.fill(live[key])
        print(f"  {key}: filled {SIZE / GIB:.2f} GiB in {fill_s[key]:.1f}s", flush=True)
    for rep in range(REPS):
        order = targets[rep % len(targets):] + targets[: rep % len(targets)]
        for job in jobs:
            for key in order:
                r = bench.run_job(live[key], job)
                r["rep"] = rep
                runs.append(r)
                print(f"  rep {rep + 1} {job.id:22} {key:6} {r['iops']:>10,.0f} IOPS "
                      f"p50 {r['p50_us']:8.1f}µs  load {r['load1']:.2f}", flush=True)
    for t in live.values():
        t.stop()
    bench.live = []

    # Fresh-space runs: a new, never-written volume per repetition and target; each fresh
    # job writes its own half of it.
    if fresh_jobs:
        for rep in range(REPS):
            order = targets[rep % len(targets):] + targets[: rep % len(targets)]
            for key in order:
                name = f"fresh-{key}-{rep}"
                t = bench.start(key, name, FRESH_SIZE, fresh=True)
                half = FRESH_SIZE // len(fresh_jobs)
                # Afterwards the servers are killed and the files deleted unflushed, so the
                # last job's dirty data is never written back: no later run waits for it, and
                # nothing allocates (and, with `-o discard`, discards) hundreds of thousands
                # of scattered blocks just to delete them (minutes on this VM).
                for i, job in enumerate(fresh_jobs):
                    r = bench.run_job(t, job, offset=i * half, size=half)
                    r["rep"] = rep
                    runs.append(r)
                    print(f"  rep {rep + 1} {job.id:22} {key:6} {r['iops']:>10,.0f} IOPS "
                          f"p50 {r['p50_us']:8.1f}µs  load {r['load1']:.2f}", flush=True)
                t.stop(kill=True)
                shutil.rmtree(t.scratch, ignore_errors=True)

    finished = datetime.datetime.now(datetime.timezone.utc)
    up_end = uptime()
    summary = {}
    for key in targets:
        for job in jobs + fresh_jobs:
            rs = [r for r in runs if r["target"] == key and r["job"] == job.id]
            if rs:
                summary[(key, job.id)] = summarize(rs)

    # Raw data for whoever wants more than the tables.
    raw_dir = REPO / "target" / "fio-compare"
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / "last.json").write_text(json.dumps({"runs": runs}, indent=1))

    # --- the RESULTS.md section ---
    cmd = os.environ.get("FIO_COMPARE_COMMAND") or " ".join(["python3", *sys.argv])
    settings = {k: v for k, v in sorted(os.environ.items())
                if (k.startswith("FIO_") and k != "FIO_COMPARE_COMMAND") or k == "IRONHORN_BIN"}
    envs = " ".join(f"{k}={v}" for k, v in settings.items())
    m = machine()
    commit = os.environ.get("FIO_COMPARE_COMMIT") or git("rev-parse", "--short", "HEAD")
    dirty = [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    loads = [r["load1"] for r in runs]
    transport = "unix socket" if TRANSPORT == "unix" else "TCP on 127.0.0.1"
    L = [
        "## fio: raw file vs nbdkit vs ironhorn",
        "",
        f"Written by `benches/fio_compare.py` — do not edit by hand; see benches/README.md.",
        "",
        f"- command: `{(envs + ' ') if envs else ''}{cmd}`",
        f"- date: {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC",
        f"- commit: `{commit}`" + (f" (working tree had changes in: {', '.join(dirty)})"
                                   if dirty and not os.environ.get("FIO_COMPARE_COMMIT") else "")
        + (f"; binary sha256 `{bin_sha}…`" if bin_sha else ""),
        f"- machine: {m['cpus']} CPUs ({m['model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}; "
        f"scratch on {fs_of(scratch)}; {version(['fio', '--version'])}, "
        f"{version(['nbdkit', '--version'])}",
        f"- load (shared machine, other builds and tests running): at start `{up_start}`; at "
        f"end `{up_end}`; 1-min load average at the start of each run: min {min(loads):.2f}, "
        f"median {med(loads):.2f}, max {max(loads):.2f}",
        f"- each job {REPS}× per target, {RUNTIME}s time-based, medians shown (IOPS range over "
        f"the runs in brackets); volume / file {SIZE / GIB:g} GiB, fully written first "
        f"(fill: " + ", ".join(f"{k} {v:.1f}s" for k, v in fill_s.items()) + ")",
        f"- fio reaches nbdkit and the engine over a **{transport}** (fio `ioengine=nbd`, "
        f"libnbd); the engine reaches its replicas over TCP on 127.0.0.1 (the only data "
        f"transport it has); the raw file is `ioengine=io_uring direct=1` on a preallocated "
        f"(fallocate) file; nbdkit is `nbdkit file` with its defaults (page cache, fdatasync "
        f"on flush)",
        "- written vs fresh space: the six main jobs run on volumes written end to end "
        "beforehand, so writes overwrite allocated space"
        + (f"; the `fresh` jobs run on a new {FRESH_SIZE / GIB:g} GiB volume for every run "
           f"(raw: fallocated, unwritten; nbdkit: sparse file; ironhorn: new replicas), fio's "
           f"random map makes every write hit a block not written before" if fresh_jobs else
           "; fresh-space jobs were skipped (FIO_FRESH=0)"),
        "- `+flush` jobs: fio `fsync=1` — after every write one fsync (raw: io_uring fsync; NBD: "
        "`NBD_CMD_FLUSH`; fio's nbd engine maps fsync only, not fdatasync); IOPS count the "
        "writes, each followed by its flush; latency columns show the write and, in brackets, "
        "the flush",
        "- before every fio run all targets' files are fsynced, so no run pays for the "
        "writeback of earlier runs' writes",
        "- ×raw, ×nbdkit: IOPS (= bandwidth) ratio of the medians. Server CPU: utime+stime "
        "from /proc/PID/stat of the server processes (nbdkit; ironhorn engine + replicas) "
        "over the fio run, per GiB moved (in brackets for reads) and per request, ironhorn "
        "split into engine (e) and replicas (r); ctx sw/op: voluntary + involuntary context "
        "switches of those processes' threads per request (– where threads came and "
        "went during the run, as nbdkit's per-connection threads do). Page-cache writeback by "
        "kernel "
        "threads is not counted.",
        "",
        "### Results",
        "",
        *results_table(jobs + fresh_jobs, summary, targets),
        "",
        "### Goals from the issue (ratios to nbdkit)",
        "",
    ]
    goal_lines, verdicts = goals_table(summary)
    L += goal_lines
    met = sum(1 for v in verdicts if v[2])
    known = sum(1 for v in verdicts if v[2] is not None)
    L += ["", f"{met} of {known} goals met in this run.", ""]
    L += ["<details><summary>every run</summary>", "",
          "| rep | job | target | IOPS | p50 µs | p99 µs | server CPU s | load |",
          "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(runs, key=lambda r: ([j.id for j in jobs + fresh_jobs].index(r["job"]),
                                         targets.index(r["target"]), r["rep"])):
        cpu = " + ".join(f"{v:.2f}" for v in r["cpu_s"].values()) or "–"
        L.append(f"| {r['rep'] + 1} | {r['job']} | {r['target']} | {r['iops']:,.0f} | "
                 f"{r['p50_us']:.1f} | {r['p99_us']:.1f} | {cpu} | {r['load1']:.2f} |")
    L += ["", "</details>", ""]
    text = "\n".join(L)
    write_section(text)
    print("\n".join(results_table(jobs + fresh_jobs, summary, targets)))
    print("\n".join(goal_lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
