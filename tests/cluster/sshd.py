"""A cluster of SSH "hosts" on this one machine, for running `ray up` for real in a test.

What `ray up` needs from a machine of an on-premise cluster is an SSH login: here
that is a dedicated unprivileged user (so `ray down`, whose `ray stop` stops every
Ray process of its user, touches only the test cluster's processes), a key made
for the test, and an sshd of our own (own config, host key and pid file in a temp
dir) listening on a few loopback addresses, port 22: Ray's SSH runner has no port
option. Nothing here listens on a non-loopback address or touches the machine's
own sshd, if any.

Everything made here is undone by its owner: `SshUser.remove`, `SshServer.stop`,
`revoke_access`. Every process is started and ended by its PID. Needs root (to
add a user and to bind port 22); `install_packages` fetches openssh-server, rsync
and acl from Debian's archive when they are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
# binary -> the Debian package that provides it
PACKAGES = {SSHD: "openssh-server", "rsync": "rsync", "ssh-keygen": "openssh-client", "setfacl": "acl"}
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def install_packages() -> None:
    """apt-get install whatever of PACKAGES is missing, without starting the packaged sshd.

    Debian's postinst would start sshd on every interface; a policy-rc.d that answers
    101 ("action forbidden") stops that, as in Debian's container images."""
    missing = sorted({pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    made_policy = not POLICY_RC.exists()
    if made_policy:
        POLICY_RC.write_text("#!/bin/sh\n# no service starts while the ray up test installs packages\nexit 101\n")
        POLICY_RC.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, text=True, check=True)
    finally:
        if made_policy:
            POLICY_RC.unlink()


def run_checked(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure raise with its output (CalledProcessError hides it)."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@dataclass(frozen=True)
class SshUser:
    """An unprivileged login made for the test: password-less, key-only, home in the test's dir."""

    name: str
    uid: int
    gid: int
    home: Path

    @classmethod
    def create(cls, name: str, home: Path) -> SshUser:
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:  # left by a run that was killed: remove it, unless something of it still runs
            old = pwd.getpwnam(name)
            cls(name, old.pw_uid, old.pw_gid, Path(old.pw_dir)).remove()
        run_checked(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                     "--user-group", name])
        # '*': no password can match, but the account is not locked ('!'), which sshd
        # without PAM would refuse even for a key
        run_checked(["usermod", "--password", "*", name])
        new = pwd.getpwnam(name)
        return cls(name, new.pw_uid, new.pw_gid, home)

    def processes(self) -> list[psutil.Process]:
        """Every live process running as this user (zombies left out)."""
        found = []
        for proc in psutil.process_iter(["uids", "status"]):
            uids, status = proc.info["uids"], proc.info["status"]
            if uids is not None and self.uid in (uids.real, uids.effective) and status != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found

    def run(self, command: str, timeout: float = 120, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        """`command` in this user's login shell (as an SSH session would run it), not over SSH."""
        return subprocess.run(["runuser", "--login", self.name, "--command", command], capture_output=True,
                              text=True, timeout=timeout, env=env)

    def remove(self) -> None:
        """userdel (home left to its owner); refuses while a process of the user runs."""
        left = self.processes()
        if left:
            raise RuntimeError(f"user {self.name} still runs {[(p.pid, p.name()) for p in left]}")
        run_checked(["userdel", self.name])


def make_key(path: Path, comment: str) -> Path:
    """A new ed25519 key pair at `path` (private, 0600) and `path`.pub."""
    run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


def grant_access(user: SshUser, paths: list[Path]) -> list[Path]:
    """Let `user` pass (search, not list) every directory on the way to each of `paths`
    that others may not pass, with an ACL entry for that user alone; symlinks are
    followed (a venv's python links into its base interpreter). Returns the
    directories given an entry, for `revoke_access`."""
    granted: list[Path] = []
    for path in paths:
        for target in {Path(os.path.abspath(path)), path.resolve()}:
            for directory in reversed(target.parents):
                mode = directory.stat().st_mode
                if not mode & stat.S_IXOTH and directory not in granted:
                    run_checked(["setfacl", "--modify", f"u:{user.name}:x", str(directory)])
                    granted.append(directory)
    return granted


def revoke_access(user: SshUser, granted: list[Path]) -> None:
    for directory in granted:
        run_checked(["setfacl", "--remove", f"u:{user.name}", str(directory)])


class SshServer:
    """sshd on `addresses`, port 22, for `user` only, with its own config and host key in `base`."""

    def __init__(self, base: Path, addresses: list[str], user: SshUser, public_key: Path) -> None:
        self.base = base
        self.addresses = addresses
        self.process: subprocess.Popen | None = None
        self.log = base / "sshd.log"
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        host_key = make_key(base / "ssh_host_ed25519_key", "ray-up-test-host")
        # in the user's home, the usual place: StrictModes checks the path up to the home dir
        # only, and refuses one that passes a world-writable dir such as /tmp
        ssh_dir = user.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        shutil.copy(public_key, authorized)
        authorized.chmod(0o600)
        for path in (ssh_dir, authorized):
            os.chown(path, user.uid, user.gid)
        self.config = base / "sshd_config"
        self.config.write_text("\n".join([
            "Port 22",
            *(f"ListenAddress {address}" for address in addresses),
            f"HostKey {host_key}",
            f"PidFile {base / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys",
            f"AllowUsers {user.name}",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes yes",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "PrintMotd no",
            # ray up and the head's autoscaler open several sessions at once per host
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "LogLevel INFO",
            "",
        ]))

    def start(self, timeout_s: float = 30) -> None:
        # privilege separation needs this empty root-owned dir (systemd makes it for the packaged sshd)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        run_checked([SSHD, "-t", "-f", str(self.config)])
        # -D: stay in the foreground, so the PID we hold is the listener's; -e: log to stderr
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + timeout_s
        pending = list(self.addresses)
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd does not answer on {pending}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((pending[0], 22), timeout=1).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.1)

    def sessions(self) -> list[psutil.Process]:
        """The per-connection sshd processes the listener forked (still running)."""
        if self.process is None or not psutil.pid_exists(self.process.pid):
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM the listener and whatever sessions it still has, by PID; SIGKILL what outlives `timeout_s`."""
        if self.process is None:
            return
        procs = [*self.sessions()]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            proc.kill()
