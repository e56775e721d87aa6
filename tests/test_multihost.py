"""Many hosts, one queue (issue 10): runners in network namespaces share a PostgreSQL store over TCP
and an objects directory, while one host's runner is SIGKILLed, another is SIGSTOPped past its
lease, a third loses its network for a while, and PostgreSQL restarts.

Each runner is a `serve` daemon in its own network namespace and UTS namespace (so that it has a
host name of its own, and no pid of it means anything to the others). Every script start and end is
logged with the host, the task, the attempt and the time, so that "never twice at once" is checked
from what really ran, not from what the database says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import CLI

NAP = 0.5

MANIFEST = """
[[step]]
name = "gen"
start = true
script = 'for i in $(seq 1 {n}); do echo "item $i" > "$OUTPUT_DIR/work_$i"; done'

[[step]]
name = "work"
script = '''
# a watcher outside the script's process group logs when the script is gone, killed or not
me="$TASK_ID $TASK_ATTEMPT $(hostname) $$"
# (a zombie counts as gone: a stopped runner cannot reap its script, which has ended all the same)
setsid sh -c 'while kill -0 "$1" 2>/dev/null && [ "$(cut -d" " -f3 /proc/$1/stat 2>/dev/null)" != Z ]; do
  sleep 0.01; done; echo "end $2 $(date +%s.%N)" >> "$3"' \\
  sh $$ "$me" {log} </dev/null >/dev/null 2>&1 &
echo "start $me $(date +%s.%N)" >> {log}
sleep {nap}
tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"
'''
"""


class Runner:
    """`task-pipeline serve` on a NetHost, under a host name of its own."""

    def __init__(self, host, hostname: str, cli: CLI, url: str, manifest: Path, scratch: Path, lease: float,
                 log: Path) -> None:
        self.host, self.hostname, self.log = host, hostname, log
        argv = [sys.executable, "-m", "task_pipeline", "serve", str(manifest), "-db", url,
                "--objects", str(cli.db / "objects"), "--scratch", str(scratch), "--lease", str(lease),
                "-parallel", "2", "--grace", "1"]
        inner = f'hostname {hostname} && exec "$@"'
        self._out = open(log, "ab")
        self.proc = host.popen(["unshare", "--uts", "--", "sh", "-c", inner, "sh", *argv], cwd=cli.tmp,
                               env=cli.environ(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=self._out)
        self.pid = self.proc.pid

    def serve_pid(self) -> int:
        """The python process (unshare and sh exec into it, so it is the one we started)."""
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()


def wait_for(pred, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def totals(cli: CLI) -> dict:
    r = cli("status", "-db", cli.db, "--json")
    return json.loads(r.out)["totals"] if r.returncode == 0 else {}


def executions(log: Path) -> dict[str, list[tuple[float, float, str, str]]]:
    """task -> [(start, end, host, attempt)], from the start lines of the scripts and the end lines
    of their watchers (which see a killed script go too)."""
    starts, spans = {}, defaultdict(list)
    for line in log.read_text().splitlines():
        what, task, attempt, host, pid, t = line.split()
        if what == "start":
            starts[(host, pid)] = (task, attempt, float(t))
        elif (host, pid) not in starts:
            continue  # killed between starting its watcher and logging its start: it did nothing
        else:
            task, attempt, t0 = starts.pop((host, pid))
            spans[task].append((t0, float(t), host, attempt))
    for (host, pid), (task, attempt, t0) in starts.items():
        spans[task].append((t0, t0 + NAP, host, attempt))
    return spans


def overlaps(spans: dict) -> list[tuple[str, tuple, tuple]]:
    out = []
    for task, s in spans.items():
        s = sorted(s)
        for a, b in zip(s, s[1:]):
            if b[0] < a[1] - 0.01:
                out.append((task, a, b))
    return out


def chaos(cli: CLI, pg_server, net_hosts, tmp_path: Path, n: int, lease: float) -> None:
    log = tmp_path / "scripts.log"
    m = cli.manifest(MANIFEST.format(n=n, nap=NAP, log=log))
    hosts = [net_hosts() for _ in range(3)]
    dbname = cli.url.rsplit("/", 1)[1]
    runners = {}

    def start(i: int) -> Runner:
        h = hosts[i]
        return Runner(h, f"host{i}", cli, pg_server.url(dbname, host=h.gateway), m, tmp_path / f"scratch{i}",
                      lease, tmp_path / f"host{i}.log")

    for i in range(3):
        runners[i] = start(i)
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) > 20, 60, "work to start")

    # host 0: SIGKILL its runner (its scripts, in their own process groups, run on); a new one starts
    runners[0].proc.send_signal(signal.SIGKILL)
    runners[0].proc.wait()
    killed = runners.pop(0)
    time.sleep(0.5)
    runners[0] = start(0)
    # host 1: SIGSTOP past its lease (others take its tasks over meanwhile), then SIGCONT: its late
    # results must be refused
    os.kill(runners[1].serve_pid(), signal.SIGSTOP)
    cli.ok("-db", cli.db, "gc", "--force")  # gc while runners elsewhere hold uncommitted work
    time.sleep(lease * 1.5)
    os.kill(runners[1].serve_pid(), signal.SIGCONT)
    # host 2: its network goes away for longer than a lease
    hosts[2].link_down()
    time.sleep(lease * 1.5)
    hosts[2].link_up()
    time.sleep(0.5)
    pg_server.restart()  # every connection drops at once
    cli.ok("-db", cli.db, "gc", "--force")
    seen = [{}]

    def finished() -> bool:
        seen[0] = t = totals(cli)
        return bool(t) and t["done"] == n + 1 and t["pending"] + t["running"] + t["leased"] == 0

    try:
        wait_for(finished, 120, f"all {n + 1} tasks to be done")
    except AssertionError as e:
        raise AssertionError(f"{e}; status: {seen[0]}; {cli('status', '-db', cli.db).out}") from None
    codes = {i: r.stop() for i, r in runners.items()}
    killed._out.close()
    texts = {i: r.text() for i, r in runners.items()}
    assert codes == {0: 0, 1: 0, 2: 0}, texts
    for i, text in texts.items():
        assert "Traceback" not in text, text

    # the results equal those of a clean run on one host
    ref = CLI(tmp_path / "ref")
    ref.tmp.mkdir()
    ref_m = ref.manifest(MANIFEST.format(n=n, nap=0, log=tmp_path / "ref.log"))
    ref.ok("run", ref_m, "-db", ref.db, "-q")
    mine = {(r["name"], r["hash"]) for r in json.loads(cli.ok("export", "done", "-db", cli.db, "--json").out)}
    want = {(r["name"], r["hash"]) for r in json.loads(ref.ok("export", "done", "-db", ref.db, "--json").out)}
    assert mine == want and len(mine) == n
    fsck = json.loads(cli("fsck", "-db", cli.db, "--json").out)
    assert fsck["ok"], fsck["problems"][:3]

    # the stopped runner's late results were refused, not recorded
    assert "late result(s) refused" in texts[1], texts[1][-3000:]
    # the runner that lost its network stopped its own scripts before its leases ran out
    assert "could not renew leases" in texts[2], texts[2][-3000:]
    # and the database restart was a line and a reconnection, not an exit
    assert "reconnected to the database" in "\n".join(texts.values())

    spans = executions(log)
    assert set(spans) >= {str(t) for t in range(2, n + 2)} or len(spans) >= n
    twice = overlaps(spans)
    reruns = sum(len(s) - 1 for s in spans.values())
    print(f"{n} tasks, {reruns} re-run(s) after lost leases, {len(twice)} overlap(s): {twice[:5]}")
    assert not twice, f"tasks ran twice at once: {twice[:5]}"


@pytest.mark.parametrize("cli", ["postgres"], indirect=True)
def test_three_hosts_survive_a_kill_a_stop_a_cut_and_a_database_restart(cli, pg_server, net_hosts, tmp_path):
    chaos(cli, pg_server, net_hosts, tmp_path, n=240, lease=4)


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["postgres"], indirect=True)
def test_three_hosts_chaos_long(cli, pg_server, net_hosts, tmp_path):
    chaos(cli, pg_server, net_hosts, tmp_path, n=800, lease=6)
