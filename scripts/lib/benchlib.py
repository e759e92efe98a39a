"""What scripts/bench-nbd and scripts/bench-migration share.

Import it from a script with
    sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
    import benchlib as lib
and set `lib.PROG` to the script's name (the prefix of `log` lines and of fatal messages).

- Errors and signals: `BenchError` (a failed run, reported; the bench goes on), `Interrupted`
  (SIGTERM/SIGHUP, raised like KeyboardInterrupt), `interruptible(on_exit)` (a `with` block that
  turns both into an exit status and always cleans up, with signals blocked while it does).
- Processes: `spawn(name, argv, logfile, ...)` starts a child in its own session that gets
  SIGTERM if we die; `stop(proc)` stops it by its pid (SIGTERM, SIGKILL after STOP_GRACE_S,
  then its process group) and says how; `stop_all()` stops every child still running.
- Hosts: `hosts_up(name, rate)` / `hosts_down(name)`: two network namespaces NAME-a (ADDR_A)
  and NAME-b (ADDR_B) joined by a veth pair, made by scripts/two-hosts (the one implementation);
  `stop_all()` removes those still up.
- Guests: `guest_argv(...)`: the command line of scripts/guest (the one guest launcher).
- `Qmp(path)`: a QMP client (the proxy's control socket or QEMU's) with `execute(command,
  arguments, timeout)` returning the "return" value and raising BenchError on an error reply,
  as `control_api.call(client, ...)` expects.
- Waiting: `wait_for_socket(path, timeout, what, proc, logfile)`, `tail(text)`, `tail_file(path)`.
- Sizes: `parse_size("256M")`, `link_bytes_per_s("1gbit")`, `human_bytes(n)`, `write_random`.
- Reports: `md_table(header, rows, align)` (markdown lines), `write_json(path, doc)`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Union

PROG = "bench"                      # set by the script: the prefix of log lines
REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = REPO / "scripts"
RELEASE = REPO / "target" / "release"
TWO_HOSTS = SCRIPTS / "two-hosts"
GUEST = SCRIPTS / "guest"
GUEST_KERNEL = REPO / "target" / "guest" / "vmlinuz"
GUEST_INITRD = REPO / "target" / "guest" / "initramfs.cpio.gz"
ADDR_A, ADDR_B = "192.0.2.1", "192.0.2.2"      # scripts/two-hosts' addresses of host A and B
STOP_GRACE_S = 5.0                  # SIGTERM, then SIGKILL after this long
CHILD_ENV = dict(os.environ, LC_ALL="C")

PathLike = Union[str, Path]


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failure that is reported (in the table) instead of aborting the bench."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP received; like KeyboardInterrupt, so cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible(on_exit: Optional[Callable[[], None]] = None) -> Iterator[SimpleNamespace]:
    """Runs the block with SIGTERM/SIGHUP raising Interrupted; Ctrl-C or those end the block with
    `state.interrupted` set and `state.rc` = 128 + the signal.  On every exit, with the signals
    blocked (no second Ctrl-C half-way): every child still running is stopped, the namespaces
    still up are removed, then `on_exit` runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    state = SimpleNamespace(rc=0, interrupted=False)
    try:
        yield state
    except (KeyboardInterrupt, Interrupted) as e:
        state.interrupted = True
        state.rc = 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
        log(f"interrupted ({e.__class__.__name__}); cleaning up")
    finally:
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            stop_all()
            if on_exit:
                on_exit()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


# --------------------------------------------------------------------------
# Processes: every child is in its own session (its pgid is its pid), gets SIGTERM if we die,
# and is stopped by its pid on every exit path.
# --------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
LIVE: dict[int, tuple[str, subprocess.Popen]] = {}    # every child started and not yet reaped


def _preexec(parent: int) -> Callable[[], None]:
    def fn() -> None:
        # If the script dies without cleaning up (SIGKILL), the child gets SIGTERM.
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return fn


def spawn(name: str, argv: list[str], logfile: PathLike, stdout_pipe: bool = False,
          cwd: Optional[PathLike] = None, env: Optional[dict] = None) -> subprocess.Popen:
    """Starts `argv` with stdout and stderr appended to `logfile` (stdout to a pipe with
    `stdout_pipe`); BenchError if it cannot be started."""
    with open(logfile, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out, cwd=cwd, env=env or CHILD_ENV, start_new_session=True,
                preexec_fn=_preexec(os.getpid()))
        except OSError as e:
            raise BenchError(f"{name}: cannot start {argv[0]}: {e}")
    LIVE[proc.pid] = (name, proc)
    return proc


def proc_name(proc: subprocess.Popen) -> str:
    return LIVE.get(proc.pid, ("process",))[0]


def stop(proc: subprocess.Popen) -> dict:
    """SIGTERM by pid, SIGKILL after STOP_GRACE_S; reap; then make sure nothing of its process
    group is left.  Returns how it went: rc, killed (SIGKILLed), died_early (it had exited
    already), leftovers (processes of its group had to be SIGKILLed)."""
    name = proc_name(proc)
    info: dict = {"rc": None, "killed": False, "died_early": False}
    try:
        if proc.poll() is not None:
            info["died_early"] = True
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) still running {STOP_GRACE_S:.0f}s after SIGTERM; SIGKILL")
                info["killed"] = True
                proc.kill()
                proc.wait()
        info["rc"] = proc.returncode
        # Anything it forked and left behind is still in its process group.
        for _ in range(20):
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        else:
            log(f"{name}: processes left in its process group {proc.pid}; SIGKILL to the group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            info["leftovers"] = True
    finally:
        LIVE.pop(proc.pid, None)
    return info


def stop_all() -> None:
    """Stops every child still running, newest first, then removes the namespaces still up."""
    for pid, (name, proc) in reversed(list(LIVE.items())):
        log(f"stopping {name} (pid {pid})")
        stop(proc)
    for name in list(NAMESPACES):
        log(f"removing namespaces {name}-a, {name}-b")
        hosts_down(name)


# --------------------------------------------------------------------------
# Two hosts (scripts/two-hosts) and the guest launcher (scripts/guest)
# --------------------------------------------------------------------------

NAMESPACES: list[str] = []          # two-hosts names that are up


def hosts_up(name: str, rate: str) -> tuple[str, str]:
    """Makes the namespaces NAME-a and NAME-b, their link limited to `rate` (tbf); returns
    their names.  SystemExit if that fails (nothing can run without them)."""
    hosts_down(name)            # a leftover of an earlier run of ours with the same name
    cp = subprocess.run([str(TWO_HOSTS), "up", name, rate], capture_output=True, text=True, env=CHILD_ENV)
    if cp.returncode != 0:
        hosts_down(name)
        raise SystemExit(f"{PROG}: scripts/two-hosts up {name} {rate} failed: {cp.stderr.strip()}")
    NAMESPACES.append(name)
    a, b = cp.stdout.split()
    return a, b


def hosts_down(name: str) -> None:
    subprocess.run([str(TWO_HOSTS), "down", name], capture_output=True, env=CHILD_ENV)
    with contextlib.suppress(ValueError):
        NAMESPACES.remove(name)


def guest_argv(*, socket: PathLike, qmp: list[PathLike], console: PathLike, cmd: str,
               args: list[str], netns: Optional[str] = None, export: str = "vm1", mem_mb: int = 256,
               incoming: bool = False) -> list[str]:
    """scripts/guest's command line: the test guest booting `guest.cmd=CMD guest.args=ARGS`
    on the NBD export at `socket`, its console into `console`, QMP on each of `qmp`."""
    argv = [str(GUEST), "--socket", str(socket), "--export", export, "--console", str(console),
            "--mem", str(mem_mb), "--cmd", cmd, "--args", ",".join(args)]
    for q in qmp:
        argv += ["--qmp", str(q)]
    if netns:
        argv += ["--netns", netns]
    if incoming:
        argv.append("--incoming")
    return argv


# --------------------------------------------------------------------------
# A QMP client: the proxy's control socket and QEMU's monitor speak the same protocol
# --------------------------------------------------------------------------

class Qmp:
    """Newline-delimited JSON over a Unix socket: a greeting {"QMP": ...}, qmp_capabilities, then
    one {"return": ...} or {"error": ...} per {"execute": ...}.  {"event": ...} lines may come at
    any time: they are kept in .events.  Every failure raises BenchError."""

    def __init__(self, path: PathLike, timeout: float = 30.0):
        self.path = str(path)
        self.timeout = timeout
        self.events: list[dict] = []
        self._buf = b""
        self._seq = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(self.path)
            except OSError as e:
                raise BenchError(f"QMP: cannot connect to {self.path}: {e}")
            greeting = self._recv(time.monotonic() + timeout, "the greeting")
            if "QMP" not in greeting:
                raise BenchError(f"QMP: {self.path}: expected a greeting, got {json.dumps(greeting)[:200]}")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Qmp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recv(self, deadline: float, what: str) -> dict:
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"QMP: {self.path}: no reply ({what}) in time")
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError as e:
                    raise BenchError(f"QMP: {self.path}: {e} (waiting for {what})")
                if not chunk:
                    raise BenchError(f"QMP: {self.path}: connection closed (waiting for {what})")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise BenchError(f"QMP: {self.path}: not JSON: {line[:200]!r}")
            if not isinstance(msg, dict):
                raise BenchError(f"QMP: {self.path}: not a JSON object: {line[:200]!r}")
            return msg

    def execute(self, command: str, arguments: Optional[dict] = None, timeout: Optional[float] = None) -> Any:
        """Runs one command; returns its "return" value."""
        self._seq += 1
        req: dict = {"execute": command, "id": f"{PROG}-{self._seq}"}
        if arguments is not None:
            req["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise BenchError(f"QMP: {self.path}: cannot send {command}: {e}")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self._recv(deadline, command)
            if "event" in msg:
                self.events.append(msg)
                continue
            if "id" in msg and msg["id"] != req["id"]:
                continue        # a reply to somebody else's request
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {"desc": msg["error"]}
                raise BenchError(f"{command} failed: {err.get('class', '?')}: {err.get('desc', '?')}")
            if "return" in msg:
                return msg["return"]
            # Anything else (a second greeting?) is not for us.


# --------------------------------------------------------------------------
# Waiting, logs
# --------------------------------------------------------------------------

def tail(text: str, lines: int = 8) -> str:
    """The last `lines` lines of `text`, on one line."""
    t = (text or "").strip().splitlines()[-lines:]
    return " | ".join(t) if t else "(no output)"


def tail_file(path: PathLike, lines: int = 4) -> str:
    try:
        return tail(Path(path).read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"


def wait_for_socket(path: PathLike, timeout: float, what: str = "socket",
                    proc: Optional[subprocess.Popen] = None, logfile: Optional[PathLike] = None) -> None:
    """Until `path` is a socket; BenchError when `timeout` passes or `proc` exits first."""
    path = str(path)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        if proc is not None and proc.poll() is not None:
            why = f"{proc_name(proc)} exited ({proc.returncode}) before it appeared"
        elif time.monotonic() > deadline:
            why = f"did not appear within {timeout:.0f}s"
        else:
            time.sleep(0.02)
            continue
        raise BenchError(f"{what} {path} {why}" + (f"; log: {tail_file(logfile)}" if logfile else ""))


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

def parse_size(s: str) -> int:
    """An argparse type: `256M`, `4G`, `1073741824`; a multiple of 1 MiB, at least 16 MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (examples: 256M, 4G, 1073741824)")
    n = int(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    if n < 16 * 2**20 or n % 2**20:
        raise argparse.ArgumentTypeError("sizes must be a multiple of 1 MiB and at least 16 MiB")
    return n


def link_bytes_per_s(rate: str) -> float:
    """A tc rate (`1gbit`, `100mbit`, `10mbps`) in bytes per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad link rate {rate!r} (examples: 1gbit, 100mbit)")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return n / 8 if m.group(3).lower() == "bit" else n


def human_bytes(n: int, whole: bool = False) -> str:
    """`1.5 GiB`; with `whole`, the largest unit that divides n (`1536 MiB`), else MiB with a
    decimal."""
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= f and (n % f == 0 or not whole):
            return f"{n / f:g} {unit}" if n % f else f"{n // f} {unit}"
    return f"{n / 2**20:.1f} MiB" if whole else f"{n} B"


def write_random(f, size: int, chunk: int = 8 * 2**20) -> int:
    """Writes `size` random bytes into the open file `f`; returns `size`."""
    left = size
    while left:
        n = min(chunk, left)
        f.write(os.urandom(n))
        left -= n
    return size


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A markdown table's lines; `align` has one letter per column, l (default) or r."""
    out = ["| " + " | ".join(header) + " |",
           "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header), "l"))]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def write_json(path: PathLike, doc: Any, indent: int = 1) -> None:
    Path(path).write_text(json.dumps(doc, indent=indent) + "\n")
    log(f"wrote {path}")
