"""cluster/local.yaml end to end: a real sshd on loopback, `ray up`, `ray submit search.py`,
`ray down`, with this machine as the head node (no workers)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")

SPACE = """\
# test-only space: one trial, one short epoch, one CPU worker
fixed:
  model: qlnet26n
  epochs: 1
  batch_size: 32
  resolution: 32
  warmup_epochs: 0
  workers: 1
  max_steps_per_epoch: 4
  hflip: false
arch:
  form: [eq3]
  act: softball
search:
  num_trials: 1
  searcher: grid
resources:
  workers_per_trial: 1
  cpus_per_worker: 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_not() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root to run sshd"
    for tool in (str(SSHD), "ssh", "ssh-keygen", "rsync"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install openssh-server openssh-client rsync)"
    return None


def pid_namespace_works() -> bool:
    """A PID namespace keeps `ray down`'s machine-wide `ray stop` to this test's processes."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Sshd:
    """sshd on 127.0.0.1:<free port> with throwaway keys; logins get HOME=<tmp>/home."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.home = root, free_port(), root / "home"
        self.key = root / "user_key"
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(root / name)], check=True)
        shutil.copy(root / "user_key.pub", root / "authorized_keys")
        self.home.mkdir()
        # The venv that this test runs in is the node's: first on PATH for Ray's login shells.
        (self.home / ".bashrc").write_text(f'export PATH="{BIN}:$PATH"\n')
        (root / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
SetEnv HOME={self.home}
""")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.namespaced = pid_namespace_works()
        cmd = [str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")]
        if self.namespaced:  # sshd is PID 1 there: when it dies, everything under it dies
            cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *cmd]
        self.log = open(root / "sshd.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while socket.socket().connect_ex(("127.0.0.1", self.port)) != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}")
            time.sleep(0.2)

    def proxy_command(self) -> str:
        """Ray's ssh takes no port: its ProxyCommand opens the port through this sshd."""
        return (f"ssh -i {self.key} -p {self.port} -o BatchMode=yes -o IdentitiesOnly=yes "
                f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                f"-W 127.0.0.1:{self.port} root@127.0.0.1")

    def _sshd_pids(self) -> list[int]:
        """sshd's own PID: unshare's child in a namespace (unshare ignores SIGTERM)."""
        if not self.namespaced:
            return [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in children.split()]

    def stop(self) -> None:
        """sshd ends, and with it (PID 1 of its namespace) every process started through it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._sshd_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=20)
        self.log.close()


def render(sshd: Sshd, root: Path, job: Path) -> tuple[Path, int]:
    """cluster/local.yaml for head 127.0.0.1 behind `sshd`, Ray on free ports in `root`."""
    cfg = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    cfg["cluster_name"] = f"qlnas-e2e-{sshd.port}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(sshd.key),
                   "ssh_proxy_command": sshd.proxy_command()}
    # The repository (where the file puts it) and the job folder travel as on a real cluster;
    # the venv is already there.
    (mount,) = cfg["file_mounts"]
    cfg["file_mounts"] = {mount.replace("~", str(sshd.home), 1): str(REPO),
                          str(sshd.home / "job"): str(job)}
    cfg["setup_commands"] = ["python -c 'import qlnas, ray, ffcv, optuna'"]
    gcs = free_port()
    stop, start = cfg["head_start_ray_commands"]
    assert "--port=6379" in start
    start = start.replace("--port=6379", f"--port={gcs}") + (
        f" --node-ip-address=127.0.0.1 --num-cpus=2 --temp-dir={root}/ray"
        f" --ray-client-server-port={free_port()} --dashboard-port={free_port()}"
        f" --dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()}")
    cfg["head_start_ray_commands"] = [stop, start]
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, gcs


def ray(*args, env, timeout):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cluster(request):
    """(config, gcs port, env, sshd); `ray down` and sshd's end run however the test ends."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="qlc", dir="/tmp"))  # short: Ray's socket paths
    (root / "cli").mkdir()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_TMPDIR=str(root / "cli"),
               TMPDIR=str(root / "cli"), RAY_USAGE_STATS_ENABLED="0")
    sshd = Sshd(root)
    job = root / "job"
    job.mkdir()
    (job / "space.yaml").write_text(SPACE)
    config, gcs = render(sshd, root, job)

    def teardown():
        try:
            if not (root / "down.ok").exists():  # the test did not get to its own `ray down`
                down = ray("down", "-y", str(config), env=env, timeout=180)
                print(down.stdout[-2000:], down.stderr[-2000:])
        finally:
            if not sshd.namespaced:  # no namespace to take Ray down with sshd
                ray("stop", "--force", env=env, timeout=120)
            sshd.stop()
            shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(teardown)
    return config, gcs, env, sshd


def test_ray_up_submit_down(cluster):
    config, gcs, env, sshd = cluster
    started = time.time()
    up = ray("up", "-y", str(config), env=env, timeout=300)
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    repo = sshd.home / "src" / "qlnas"
    assert (repo / "search_spaces" / "demo.yaml").is_file()  # file_mounts
    assert not (repo / ".venv").exists()  # .gitignore'd paths stay here
    out = sshd.root / "out"
    sub = ray("submit", str(config), str(REPO / "search.py"), "--", "--space",
              str(sshd.home / "job" / "space.yaml"), "--out", str(out),
              "--address", f"127.0.0.1:{gcs}", env=env, timeout=420)
    assert sub.returncode == 0, sub.stdout[-6000:] + sub.stderr[-4000:]
    board = (out / "leaderboard.md").read_text()
    assert "completed" in board, board
    assert len(list(out.glob("trials/*/run/tb/events.out.tfevents.*"))) == 1
    # `qlnas` is on the head's PATH for `ray exec` too (the README's report and TensorBoard).
    rep = ray("exec", str(config), f"qlnas report {out} --format csv", env=env, timeout=120)
    assert rep.returncode == 0 and "completed" in rep.stdout, rep.stdout[-4000:]
    down = ray("down", "-y", str(config), env=env, timeout=180)
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
    (sshd.root / "down.ok").touch()
    with socket.socket() as s:  # the head's Ray is gone
        assert s.connect_ex(("127.0.0.1", gcs)) != 0
    print(f"ray up + submit + down: {time.time() - started:.0f} s")
