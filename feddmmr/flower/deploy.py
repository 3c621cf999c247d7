"""Launch the Flower app: a local simulation, or a SuperLink + K SuperNodes on 127.0.0.1.

    python -m feddmmr.flower.deploy init-home [--flwr-home .flwr]
    python -m feddmmr.flower.deploy simulate --nodes 4 -c num_rounds=2 -c stage=1 [-c data=...]
    python -m feddmmr.flower.deploy deploy   --nodes 3 -c num_rounds=2 -c stage=1
    python -m feddmmr.flower.deploy partition --nodes 3 --data ../ml-1m --out data/ml-1m-3 [--top-users all]

Both write ``$FLWR_HOME/config.toml`` (Flower 1.42 reads SuperLink connections there, not
from pyproject.toml), set the offline switches, run ``flwr run flower_app <connection>
--stream``, and stop every process they started, also on failure or Ctrl-C:

* ``simulate``: the ``local`` connection (``address = ":local:"``); ``flwr run`` starts a
  background simulation SuperLink on the ports in ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
  ``FLWR_LOCAL_CONTROL_API_PORT`` (free ports picked here) that outlives it: it is found by
  its log file inside this ``FLWR_HOME`` and stopped with its process group.
* ``deploy``: ``flower-superlink --insecure`` and K ``flower-supernode --insecure`` with
  ``--node-config "partition-id=i num-partitions=K"``, each in its own process group, PIDs
  recorded; the ``loopback`` connection points at the SuperLink. ``--insecure`` is for
  loopback only: see docs/flower.md for TLS and SuperNode authentication.

``partition`` splits a dataset into one file per node (:mod:`feddmmr.data.partitions`); with
``-c data=<that folder>`` each node reads only its own users' sequences.

Paths in the run config are made absolute here. The run's outcome is read from the run
directory (``flwr run --stream`` exits 0 even when the ServerApp failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "flower_app"
DEFAULT_HOME = REPO / ".flwr"

# Every Flower process here runs offline and quiet (see ../shared/docs/FLOWER_NOTES.md).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DASHBOARD": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
PATH_KEYS = ("data", "features", "init", "out", "cache")


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    bin_dir = str(Path(sys.executable).parent)  # the venv's flwr / flower-* scripts
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def write_flower_config(flwr_home: Path, loopback: str | None = None) -> Path:
    """``$FLWR_HOME/config.toml``: ``local`` (the simulation, default) and optionally ``loopback``."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    text = ('# Written by feddmmr.flower.deploy. Flower 1.42 reads SuperLink connections here.\n'
            '# The simulation size and resources go on the command line:\n'
            '#   flwr run flower_app local --federation-config "num-supernodes=4 client-resources-num-cpus=1"\n'
            '[superlink]\ndefault = "local"\n\n'
            '[superlink.local]\naddress = ":local:"\n')
    if loopback:
        text += f'\n[superlink.loopback]\naddress = "{loopback}"\ninsecure = true\n'
    path = home / "config.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def run_config_arg(values: dict) -> str:
    """``{"num_rounds": 2, "data": "/x"}`` -> ``num_rounds=2 data="/x"`` (absolute paths)."""
    parts = []
    for key, value in values.items():
        if key in PATH_KEYS and value not in ("", None):
            value = str(Path(str(value)).expanduser().resolve())
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


def parse_value(text: str):
    """A command-line ``key=value`` value: TOML scalars as such, anything else as a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# --------------------------------------------------------------------------- processes

@dataclass
class Launched:
    name: str
    process: subprocess.Popen
    log: Path


def become_subreaper() -> None:
    """Adopt our orphaned descendants (Linux), so processes that Flower starts without waiting for
    them (a SuperNode's SuperExec, a detached SuperLink) are reaped here instead of lingering as
    zombies under an init that does not reap."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap_adopted(own: set[int] = frozenset()) -> None:
    """Reap exited processes adopted as subreaper (never the children this program manages itself)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            try:
                os.waitpid(int(entry.name), os.WNOHANG)
            except ChildProcessError:
                pass


@dataclass
class Processes:
    """Processes started here, each in its own session (process group = its PID), stopped in reverse."""

    log_dir: Path
    env: dict[str, str]
    started: list[Launched] = field(default_factory=list)

    def __post_init__(self) -> None:
        become_subreaper()

    def start(self, name: str, command: list[str]) -> Launched:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        launched = Launched(name, process, log)
        self.started.append(launched)
        return launched

    def check(self) -> None:
        for item in self.started:
            if item.process.poll() is not None:
                raise RuntimeError(f"{item.name} (pid {item.process.pid}) exited with {item.process.returncode}; "
                                   f"see {item.log}:\n{_tail(item.log)}")

    def pids(self) -> set[int]:
        """Every process running under the ones started here, right now."""
        table = process_table()
        return set().union(*(process_tree(item.process.pid, table) for item in self.started)) if self.started else set()

    def stop(self, grace: float = 10.0) -> None:
        own = {item.process.pid for item in self.started}
        for item in reversed(self.started):
            stop_tree(item.process.pid, grace, item.process)
        self.started.clear()
        reap_adopted(own)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def process_table() -> dict[int, tuple[int, int, str]]:
    """``pid -> (ppid, pgid, state)`` of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def process_tree(pid: int, table: dict | None = None) -> set[int]:
    """``pid``, its descendants and the members of its process group (Flower's SuperExec starts
    the ServerApp/ClientApp processes, some in sessions of their own)."""
    table = process_table() if table is None else table
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _, _) in table.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree | {p for p, (_, pgid, _) in table.items() if pgid == pid}


def alive(pids) -> set[int]:
    """The ``pids`` that still run (zombies count as gone)."""
    table = process_table()
    return {p for p in pids if p in table and table[p][2] != "Z"}


def stop_tree(pid: int, grace: float = 10.0, process: subprocess.Popen | None = None) -> None:
    """SIGTERM ``pid`` and everything it started (see :func:`process_tree`), SIGKILL what is left
    after ``grace`` seconds. Only processes found from ``pid``: never by name."""
    targets = process_tree(pid)
    for target in targets:
        try:
            os.kill(target, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while alive(targets) and time.monotonic() < deadline:
        if process is not None:
            process.poll()  # reap our direct child as soon as it exits
        time.sleep(0.1)
    for target in alive(targets):
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process is not None:
        process.wait(timeout=10)


def local_superlinks(flwr_home: Path) -> list[int]:
    """PIDs of the background simulation SuperLinks ``flwr run`` started for this ``FLWR_HOME``."""
    marker = str(Path(flwr_home).resolve() / "local-superlink")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(a.endswith("flower-superlink") for a in text[:2]) and any(marker in a for a in text):
            found.append(int(entry.name))
    return found


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(url: str, timeout: float, processes: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processes is not None:
            processes.check()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


# --------------------------------------------------------------------------- runs

@dataclass
class RunResult:
    returncode: int
    output: str
    run_dir: Path
    history: dict | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.history is not None and "final" in self.history


def _flwr_run(app_dir: Path, connection: str, run_config: dict, env: dict, log: Path, timeout: float,
              extra: list[str], echo: bool) -> tuple[int, str]:
    command = [_tool("flwr"), "run", str(app_dir), connection, "--run-config", run_config_arg(run_config),
               *extra, "--stream"]
    log.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, cwd=str(REPO))
        timer = threading.Timer(timeout, process.kill)  # `flwr run` is our child: stop it on timeout
        timer.start()
        try:
            for line in process.stdout:
                lines.append(line)
                handle.write(line)
                handle.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, "".join(lines)


def _result(code: int, output: str, run_config: dict, started: float) -> RunResult:
    """The run's outcome from its run directory (a history written before ``started`` is not this run's)."""
    run_dir = Path(str(run_config.get("out", "runs/flower"))).expanduser().resolve()
    history = None
    path = run_dir / "train_history.json"
    if path.exists() and path.stat().st_mtime >= started - 1:
        history = json.loads(path.read_text())
    return RunResult(code, output, run_dir, history, time.time() - started)


def simulate(run_config: dict, nodes: int, flwr_home: Path = DEFAULT_HOME, app_dir: Path = APP_DIR,
             cpus_per_node: int = 1, timeout: float = 3600.0, echo: bool = True) -> RunResult:
    """``flwr run`` on the local simulation SuperLink with ``nodes`` virtual SuperNodes."""
    flwr_home = Path(flwr_home).resolve()
    write_flower_config(flwr_home)
    env = flower_env(flwr_home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                                 "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    federation = f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_node}"
    become_subreaper()  # the SuperLink `flwr run` detaches is then ours to reap
    tick = time.time()
    try:
        code, output = _flwr_run(Path(app_dir), "local", run_config, env, flwr_home / "logs" / "flwr_run.log",
                                 timeout, ["--federation-config", federation], echo)
    finally:
        for pid in local_superlinks(flwr_home):  # started by `flwr run`, in its own session
            stop_tree(pid)
        reap_adopted()
    return _result(code, output, run_config, tick)


@dataclass
class Deployment:
    """A SuperLink and K SuperNodes on 127.0.0.1 (``--insecure``): start, run apps, stop."""

    nodes: int
    flwr_home: Path = DEFAULT_HOME
    node_config: dict = field(default_factory=dict)  # extra --node-config entries for every node
    threads: int | None = None  # torch/OpenMP threads per ClientApp process (OMP_NUM_THREADS)
    processes: Processes | None = None
    port: int = 0

    def __enter__(self) -> "Deployment":
        self.flwr_home = Path(self.flwr_home).resolve()
        self.port = free_port()
        # the SuperNodes' SuperExec looks for new ClientApp tasks every second by default
        extra = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
        if self.threads:
            extra.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self.env = flower_env(self.flwr_home, extra)
        self.processes = Processes(self.flwr_home / "logs", self.env)
        try:
            self.processes.start("superlink", [
                _tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"])
            _wait_http(f"http://127.0.0.1:{self.port}/health", 60, self.processes)
            for i in range(self.nodes):
                entries = {"partition-id": i, "num-partitions": self.nodes, **self.node_config}
                node_config = " ".join(f"{k}={_toml_value(v)}" for k, v in entries.items())
                self.processes.start(f"supernode-{i}", [
                    _tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--node-config", node_config, "--host", "127.0.0.1", "--port", str(free_port()),
                    "--max-retries", "10", "--max-wait-time", "120"])
            write_flower_config(self.flwr_home, f"127.0.0.1:{self.port}")
        except BaseException:
            self.processes.stop()
            raise
        return self

    def run(self, run_config: dict, app_dir: Path = APP_DIR, timeout: float = 3600.0, echo: bool = True,
            log_name: str = "flwr_run") -> RunResult:
        self.processes.check()
        tick = time.time()
        code, output = _flwr_run(Path(app_dir), "loopback", run_config, self.env,
                                 self.flwr_home / "logs" / f"{log_name}.log", timeout, [], echo)
        return _result(code, output, run_config, tick)

    def __exit__(self, *exc) -> None:
        if self.processes is not None:
            self.processes.stop()


def deploy(run_config: dict, nodes: int, flwr_home: Path = DEFAULT_HOME, app_dir: Path = APP_DIR,
           timeout: float = 3600.0, echo: bool = True, threads: int | None = None) -> RunResult:
    with Deployment(nodes, flwr_home, threads=threads) as deployment:
        return deployment.run(run_config, app_dir, timeout, echo)


# --------------------------------------------------------------------------- command line

def add_partition_parser(sub) -> None:
    from ..cli_args import add_data_args
    from ..config import TrainConfig

    split = sub.add_parser("partition", help="split a dataset into one file per node (each node reads only its own)")
    split.add_argument("--nodes", type=int, required=True, help="SuperNodes (= user partitions)")
    split.add_argument("--out", type=Path, required=True, help="the partition folder (give it as the run's `data`)")
    add_data_args(split, default_top=TrainConfig().top_users)


def partition(args: argparse.Namespace) -> int:
    """Read the dataset once (as a run with ``--top-users`` would) and write one file per node."""
    from ..cli_args import load_from_args
    from ..data.partitions import write_partitions

    top = None if args.top_users in (None, "all") else args.top_users
    print(write_partitions(load_from_args(args), args.nodes, args.out, top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m feddmmr.flower.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-home", help="write $FLWR_HOME/config.toml (the `local` simulation connection)")
    init.add_argument("--flwr-home", type=Path, default=DEFAULT_HOME)
    for name, help_text in (("simulate", "run the app in the local simulation"),
                            ("deploy", "run the app on a SuperLink + SuperNodes on 127.0.0.1")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--nodes", type=int, default=3, help="SuperNodes (= user partitions)")
        cmd.add_argument("--flwr-home", type=Path, default=DEFAULT_HOME)
        cmd.add_argument("--app", type=Path, default=APP_DIR)
        cmd.add_argument("--timeout", type=float, default=3600.0)
        if name == "deploy":
            cmd.add_argument("--threads", type=int, default=None,
                             help="torch threads per ClientApp process (OMP_NUM_THREADS); 1 avoids "
                                  "oversubscribing when several SuperNodes share a machine")
        cmd.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                         help="run config entry (repeatable), e.g. -c num_rounds=2 -c stage=1")
    add_partition_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "partition":
        return partition(args)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every process started here is stopped on the way out
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    if args.command == "init-home":
        print(write_flower_config(args.flwr_home))
        return 0
    run_config = {}
    for pair in args.run_config:
        key, _, value = pair.partition("=")
        run_config[key.strip()] = parse_value(value.strip())
    run_config.setdefault("out", str(REPO / "runs" / f"flower_{args.command}"))
    if args.command == "simulate":
        result = simulate(run_config, args.nodes, flwr_home=args.flwr_home, app_dir=args.app, timeout=args.timeout)
    else:
        result = deploy(run_config, args.nodes, flwr_home=args.flwr_home, app_dir=args.app, timeout=args.timeout,
                        threads=args.threads)
    if not result.ok:
        print(f"the Flower run did not complete (flwr exit {result.returncode}); logs in {args.flwr_home / 'logs'}",
              file=sys.stderr)
        return 1
    print(f"run directory: {result.run_dir} ({result.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
