"""A throwaway single-node Slurm on this machine, for tests/test_slurm.py.

Debian's slurm-wlm + munge (install them with .ci/slurm-deps). As root:
  * munged runs under the munge user (started here unless one already answers);
  * slurm.conf is written to /etc/slurm/slurm.conf: the executor plugin's job step strips
    SLURM_CONF before its inner `srun`, so the config must sit at the compiled-in path;
  * state, spool, pid and log files live under a scratch folder;
  * `stop()` ends the daemons it started by their PIDs and removes the config it wrote.

A config at /etc/slurm/slurm.conf that this helper did not write is never overwritten, and a
second test cluster is never started beside a running one (a lock file guards the machine-wide
config path and ports): `start()` raises SlurmUnavailable instead (the test skips, saying why).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by quantdiff tests/slurm_cluster.py: a throwaway single-node test cluster"
PARTITION = "debug"
# One test cluster per machine: the config path and the daemons' ports are machine-wide.
LOCK = Path(tempfile.gettempdir()) / "quantdiff-slurm-test.lock"
DEPS = Path(__file__).resolve().parents[1] / ".ci" / "slurm-deps"


class SlurmUnavailable(RuntimeError):
    """Slurm can't be installed or started here; the message says why."""


def _run(*cmd, check=True, timeout=60, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmUnavailable("no MemTotal in /proc/meminfo")


def _read_pid(path: Path, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    raise SlurmUnavailable(f"no PID file {path} after {timeout:.0f} s")


def _munge_works() -> bool:
    if not shutil.which("munge") or not shutil.which("unmunge"):
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


class SlurmCluster:
    """One node (this host, at 127.0.0.1) in one default partition, `debug`."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        # Leave a little for the OS: slurmd drains a node that has less than it claims.
        self.memory_mb = int(_memory_mb() * 0.9)
        self.partition = PARTITION
        self._pids: dict[str, int] = {}
        self._wrote_conf = False
        self._lock = None

    # -- set-up -------------------------------------------------------------------------
    def ensure_installed(self):
        if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
            return
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurm-wlm/munge are not installed and we are not root to install them")
        if not DEPS.exists():
            raise SlurmUnavailable(f"slurm-wlm/munge are not installed and {DEPS.name} is missing")
        try:
            _run("bash", str(DEPS), timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            tail = (getattr(err, "stderr", "") or "")[-500:]
            raise SlurmUnavailable(f".ci/slurm-deps could not install slurm-wlm/munge: {tail}") from None
        if not shutil.which("sbatch"):
            raise SlurmUnavailable(".ci/slurm-deps ran but sbatch is still missing")

    def _conf_text(self) -> str:
        s = self.scratch
        return "\n".join([
            MARKER,
            "ClusterName=quantdiff-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            # squeue must still list finished jobs when the executor asks (it warns below 120 s).
            "MinJobAge=600",
            # Enforce time limits promptly: the timeout test waits for one.
            "OverTimeLimit=0",
            "KillWait=5",
            "InactiveLimit=0",
            "SchedulerType=sched/backfill",
            f"StateSaveLocation={s}/state",
            f"SlurmdSpoolDir={s}/spool",
            f"SlurmctldPidFile={s}/slurmctld.pid",
            f"SlurmdPidFile={s}/slurmd.pid",
            f"SlurmctldLogFile={s}/slurmctld.log",
            f"SlurmdLogFile={s}/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _start_munge(self):
        if _munge_works():
            return  # someone else's munged: use it, never stop it
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run("mungekey", "-c", "-k", str(key))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        pidfile = run_dir / "munged.pid"
        pidfile.unlink(missing_ok=True)
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        self._pids["munged"] = _read_pid(pidfile)
        deadline = time.monotonic() + 10
        while not _munge_works():
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged started but `munge -n | unmunge` fails")
            time.sleep(0.2)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd and writing /etc/slurm/slurm.conf needs root")
        self.ensure_installed()
        self._lock = open(LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise SlurmUnavailable(f"another test Slurm is running on this machine ({LOCK} is held)") from None
        if CONF.exists() and MARKER not in CONF.read_text(errors="replace"):
            self.stop()
            raise SlurmUnavailable(f"{CONF} exists and was not written by this helper; not overwriting it")
        for sub in ("state", "spool"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            CONF.parent.mkdir(parents=True, exist_ok=True)
            CONF.write_text(self._conf_text())
            self._wrote_conf = True
            # -c: start from a clean state (no jobs from an earlier test run).
            _run("slurmctld", "-c")
            self._pids["slurmctld"] = _read_pid(self.scratch / "slurmctld.pid")
            _run("slurmd")
            self._pids["slurmd"] = _read_pid(self.scratch / "slurmd.pid")
            self._wait_idle(timeout)
        except (subprocess.CalledProcessError, OSError, SlurmUnavailable) as err:
            detail = getattr(err, "stderr", "") or str(err)
            self.stop()
            raise SlurmUnavailable(f"could not start Slurm: {detail.strip()[-500:]}") from None
        return self

    def _wait_idle(self, timeout: float):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
            state = out.stdout.strip()
            if out.returncode == 0 and state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node not idle after {timeout:.0f} s (sinfo says {state!r}); see {self.scratch}")

    # -- queries ------------------------------------------------------------------------
    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (JobState, JobName, Reason, ...)."""
        out = _run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def controller_log(self) -> str:
        return (self.scratch / "slurmctld.log").read_text(errors="replace")

    # -- tear-down ----------------------------------------------------------------------
    def stop(self):
        if "slurmctld" in self._pids:
            # Our private cluster: whatever is still queued or running is ours.
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], capture_output=True, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._wrote_conf:
            CONF.unlink(missing_ok=True)
            self._wrote_conf = False
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
