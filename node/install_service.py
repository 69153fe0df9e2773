"""`llorch node install-service`: a systemd unit that runs this install's `llorch node start` on one node.toml.

Every line of the unit comes from something read here, not assumed:

- the command: the `llorch` script running now, else the one beside this Python (a virtualenv's or pipx's bin/),
  else this Python with ``-m llorch.gateway`` (the same command line as a module);
- the config: an absolute path, which the command has already loaded (a node.toml that does not load, a bad value
  or an unknown key, fails now, not in a restart loop);
- the user: a system unit runs as the owner of node.toml (who ran `node init` and owns the key); a user unit runs as
  you, so it refuses a node.toml someone else owns;
- the environment: the variables that say where `node init` put things (XDG base directories, the model cache) go
  along when the unit runs as the user who runs this command; for another user, systemd's HOME finds theirs.

Exit code 2 of `node start` means it cannot start with this config (a bad value, a key it cannot read, a taken port):
``RestartPreventExitStatus=2`` stops the restarts there, since restarting cannot help; anything else (a crash, the
OOM killer) restarts the node after ``RESTART_S``.
"""

from __future__ import annotations

import os
import pwd
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from llorch.node import limits
from llorch.node.errors import ConfigError
from llorch.node.init import default_config_path
from llorch.node.lifecycle import STARTUP_FAILED

UNIT_NAME = "llorch-node.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
RESTART_S = 10                  # between a crash and the restart: long enough not to spin, short for the uptime SLA
STOP_TIMEOUT_S = 30             # SIGTERM to SIGKILL: the node's stop (libp2p disconnect, then close: 2 × 3 s at most;
                                # a token being generated; the ledger's last append) with room to spare
CARRIED_VARIABLES = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "LLORCH_MODEL_CACHE")

assert STOP_TIMEOUT_S > 2 * limits.SHUTDOWN_GRACE_S


@dataclass(frozen=True)
class Unit:
    """What the unit says; ``user`` is None for a user unit (systemd --user runs it as its own user)."""

    command: tuple[str, ...]                 # ExecStart's words; the first an absolute path
    config_path: Path
    user: str | None
    environment: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not Path(self.command[0]).is_absolute() or not self.config_path.is_absolute():
            raise ConfigError(f"the unit needs absolute paths, not {self.command[0]} and {self.config_path}")
        words = [*self.command, str(self.config_path), self.user or "", *(v for pair in self.environment for v in pair)]
        if any("\n" in word or "\r" in word for word in words):
            raise ConfigError("a path or variable has a line break, which a systemd unit cannot hold: move it")

    @property
    def exec_start(self) -> tuple[str, ...]:
        return (*self.command, "node", "start", "--config", str(self.config_path))

    def text(self) -> str:
        user = f"User={self.user}\n" if self.user is not None else ""
        environment = "".join(f"Environment={_quoted(f'{name}={value}', dollars=False)}\n"
                              for name, value in self.environment)
        return f"""\
# Written by `llorch node install-service` for this install of llorch and this node.toml: after moving either,
# run that command again rather than editing this file.
[Unit]
Description=llorch provider node
Wants=network-online.target
After=network-online.target

[Service]
{user}{environment}ExecStart={" ".join(_quoted(word) for word in self.exec_start)}
# Exit {STARTUP_FAILED}: `node start` cannot start with this config (journalctl says why); restarting cannot help.
Restart=on-failure
RestartPreventExitStatus={STARTUP_FAILED}
RestartSec={RESTART_S}
# SIGTERM: the node closes its connections and its ledger, then exits 0.
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_S}

[Install]
WantedBy={"multi-user.target" if self.user is not None else "default.target"}
"""


def _quoted(word: str, dollars: bool = True) -> str:
    """``word`` as one word of a unit file: % (specifiers) doubled, $ (variables, in ExecStart) doubled, quoted with
    C escapes if it has a blank, a quote or a backslash."""
    word = word.replace("%", "%%")
    if dollars:
        word = word.replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def entry_command(argv0: str, python: str) -> tuple[str, ...]:
    """The command line that runs this install's `llorch`: the running script, else the script beside ``python``
    (a venv's bin/: not resolved, which would leave the venv), else ``python -m llorch.gateway``."""
    if Path(argv0).name == "llorch" and os.access(argv0, os.X_OK):
        return (os.path.abspath(argv0),)
    beside = Path(python).parent / "llorch"
    if os.access(beside, os.X_OK):
        return (os.path.abspath(beside),)
    return (os.path.abspath(python), "-m", "llorch.gateway")


def config_path_of(given: Path | None, environ: Mapping[str, str]) -> Path:
    """``--config`` as an absolute path, else the node.toml `node init` wrote; ConfigError if there is none."""
    if given is not None:
        return Path(os.path.abspath(given))
    path = Path(os.path.abspath(default_config_path()))
    if not path.exists():
        sudo = environ.get("SUDO_USER")
        under_sudo = f" (that is root's; under sudo give --config ~{sudo}/.config/llorch/node.toml)" if sudo else ""
        raise ConfigError(f"no --config and no {path}{under_sudo}: run `llorch node init` first, as the user the "
                          f"node is to run as")
    return path


def plan(config_path: Path, user_unit: bool, command: tuple[str, ...], environ: Mapping[str, str]) -> Unit:
    """The unit for ``config_path`` (absolute, already loaded): a user unit, or a system unit for its owner."""
    me = _user_name(os.geteuid())
    owner_uid = config_path.stat().st_uid
    owner = _user_name(owner_uid)
    if user_unit and owner_uid != os.geteuid():
        raise ConfigError(f"{config_path} belongs to {owner}, and a --user unit runs as you ({me}), who may not "
                          f"read its key: run this command as {owner}")
    carried = tuple((name, os.path.abspath(environ[name])) for name in CARRIED_VARIABLES if environ.get(name)) \
        if owner_uid == os.geteuid() else ()
    return Unit(command, config_path, None if user_unit else owner, carried)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:                # a uid with no passwd entry (a container): systemd's User= takes the number
        return str(uid)


def default_unit_path(user_unit: bool) -> Path:
    """Where systemd looks: /etc/systemd/system, or ~/.config/systemd/user (the user manager's own, not this shell's
    XDG_CONFIG_HOME, which the user manager does not see)."""
    return Path.home() / ".config" / "systemd" / "user" / UNIT_NAME if user_unit else SYSTEM_UNIT_DIR / UNIT_NAME


def write_unit(unit: Unit, path: Path, user_unit: bool) -> None:
    """Write ``unit`` to ``path`` (mode 0644, atomically); ConfigError naming the path and the remedy."""
    if path.suffix != ".service":
        raise ConfigError(f"--out {path}: a systemd service unit's file name ends in .service")
    if user_unit and path == default_unit_path(True):
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
        raise ConfigError(f"no directory {path.parent}" + (": is this a systemd machine? --print shows the unit"
                                                          if path.parent == SYSTEM_UNIT_DIR else ""))
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(unit.text(), encoding="utf-8")
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except PermissionError:
        raise ConfigError(f"cannot write {path}: permission denied. Install it as root with `llorch node "
                          f"install-service --print [--config F] | sudo tee {path}`, or a unit of your own: "
                          f"--user") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def next_steps(unit: Unit, path: Path, written: bool) -> str:
    """What to run after writing (or printing) the unit at ``path``."""
    user_unit = unit.user is None
    scope = "--user " if user_unit else ""
    sudo = "" if user_unit or os.geteuid() == 0 else "sudo "
    name = path.name.removesuffix(".service")
    known = path.parent == default_unit_path(user_unit).parent
    enable = name if known else str(path)       # a unit outside systemd's directories is enabled by its path
    runs = f"`{shlex.join(unit.exec_start)}` as {unit.user or 'you'}"
    lines = [f"wrote {path}: {runs}; next:" if written else f"save it as {path} ({runs}), then:"]
    lines += [f"  {sudo}systemctl {scope}daemon-reload && {sudo}systemctl {scope}enable --now {enable}"]
    if user_unit:
        lines += ["  loginctl enable-linger     # start it at boot and keep it running when you log out"]
    lines += [f"  journalctl {scope}-u {name} -f     # its log; `llorch node status` once it runs"]
    return "\n".join(lines)
