"""Capability detection: what this machine is, for the node's capability record.

Each probe reads one source and has its path or command injectable, so tests can describe
another machine (:class:`HostProbe`):

* arch: ``platform.machine()`` (``x86_64``, ``aarch64``, ``s390x``, ...);
* OS release: ``ID`` and ``VERSION_ID`` of ``/etc/os-release`` as ``fedora-41``;
* CPUs: ``os.sched_getaffinity`` (the CPUs this process may use), model from
  ``/proc/cpuinfo`` (``model name``, or ``Processor``/``cpu`` on other arches);
* memory: ``MemTotal`` of ``/proc/meminfo``;
* disk: free space in the work directory (``shutil.disk_usage``);
* VM or bare metal: ``systemd-detect-virt`` where present (it knows dozens of
  hypervisors and containers), else the ``hypervisor`` CPU flag, else DMI vendor and
  product strings (``/sys/class/dmi/id``);
* build types: ``rpm`` needs ``rpmbuild`` and ``bwrap``, ``make`` needs ``make`` and
  ``bwrap`` (the daemon additionally proves that bwrap can create its sandbox).

:func:`apply_overrides` lets every value of the configuration's ``[capability]`` table win.
Nothing here raises for an odd machine: an unreadable source gives a conservative value
(``unknown``, 0), because a node with a partial record is better than a node that does not
start.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from .._records import DETECTED_FIELDS, MachineType, NodeTraits
from ._config import CapabilityOverrides

__all__ = [
    "Detected",
    "HostProbe",
    "apply_overrides",
    "detect",
    "os_token",
]

_NOT_TOKEN = re.compile(r"[^a-z0-9._+-]+")
#: DMI strings that mean "a virtual machine" when systemd-detect-virt is absent.
_VM_DMI = (
    "qemu", "kvm", "vmware", "virtualbox", "innotek", "xen", "bochs", "bhyve",
    "microsoft corporation virtual", "hyper-v", "amazon ec2", "google compute engine",
    "openstack", "parallels", "cloud hypervisor", "firecracker",
)  # fmt: skip

#: Runs a command, returning (exit status, stdout), or None if it cannot be started.
CommandRunner = Callable[[Sequence[str]], "tuple[int, str] | None"]


def run_command(argv: Sequence[str], timeout: float = 5.0) -> tuple[int, str] | None:
    """Run ``argv`` (no shell); None if it is missing, not executable or hangs."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, timeout=timeout, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.returncode, done.stdout


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _disk_free(path: Path) -> int:
    # The work directory may not exist yet: measure its nearest existing ancestor.
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@attrs.frozen
class HostProbe:
    """Where detection looks; the defaults are this machine's."""

    os_release: Path = Path("/etc/os-release")
    cpuinfo: Path = Path("/proc/cpuinfo")
    meminfo: Path = Path("/proc/meminfo")
    dmi_dir: Path = Path("/sys/class/dmi/id")
    machine: Callable[[], str] = platform.machine
    cpu_count: Callable[[], int | None] = _usable_cpus
    run: CommandRunner = run_command
    which: Callable[[str], str | None] = shutil.which
    disk_free: Callable[[Path], int] = _disk_free


@attrs.frozen
class Detected(NodeTraits):
    """What detection found: the node's traits (the fields of a capability record but
    endpoint, TLS fingerprint and pools, which come from the configuration), and how."""

    #: How ``machine`` was decided: ``systemd-detect-virt``, ``cpu-flag``, ``dmi`` or
    #: ``default``.
    machine_source: str
    #: Facts for people (``os_pretty``, ``virt``); not published.
    notes: tuple[tuple[str, str], ...] = ()


def _read(path: Path, limit: int = 1 << 20) -> str:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def _token(text: str) -> str:
    """``text`` as a facet token: lowercase, runs of other characters become ``-``."""
    token = re.sub(r"-{2,}", "-", _NOT_TOKEN.sub("-", text.strip().lower()))
    token = token.strip("-._+")[:64]
    return token or "unknown"


def os_token(os_release_text: str) -> tuple[str, str]:
    """``(token, pretty name)`` from the text of an os-release file: ``ID-VERSION_ID``
    (``fedora-41``, ``debian-12``, ``rhel-9.4``), or ``ID`` alone for rolling releases."""
    fields: dict[str, str] = {}
    for line in os_release_text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip().startswith("#"):
            continue
        try:
            parsed = shlex.split(value)
        except ValueError:
            continue
        fields[key.strip()] = parsed[0] if parsed else ""
    ident = fields.get("ID", "") or "linux"
    version = fields.get("VERSION_ID", "")
    token = _token(f"{ident}-{version}" if version else ident)
    return token, fields.get("PRETTY_NAME", "")


def _cpu_model(cpuinfo: str) -> str:
    for key in ("model name", "Model", "Processor", "cpu model", "cpu", "machine"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                text = " ".join(value.split())
                return "".join(c for c in text if c.isprintable())[:96]
    return "unknown"


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _memory_mb(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return min(int(parts[1]) // 1024, 2**32 - 1)
    return 0


def _machine(probe: HostProbe, cpuinfo: str) -> tuple[MachineType, str, str]:
    """(machine type, how it was decided, the virtualization name if any)."""
    if probe.which("systemd-detect-virt") is not None:
        answer = probe.run(["systemd-detect-virt", "--vm"])
        if answer is not None:
            status, out = answer
            name = out.strip()
            # Exit 0 with a name: a VM; non-zero with "none": bare metal (or a container,
            # which --vm ignores: a container on bare metal builds on bare metal).
            if status == 0 and name and name != "none":
                return MachineType.VM, "systemd-detect-virt", name
            if name == "none":
                return MachineType.METAL, "systemd-detect-virt", "none"
    if "hypervisor" in _cpu_flags(cpuinfo):
        return MachineType.VM, "cpu-flag", "hypervisor"
    dmi = " ".join(
        _read(probe.dmi_dir / name, 4096).strip().lower()
        for name in ("sys_vendor", "product_name", "board_vendor", "bios_vendor")
    )
    if dmi.strip():
        for marker in _VM_DMI:
            if marker in dmi:
                return MachineType.VM, "dmi", marker
        return MachineType.METAL, "dmi", "none"
    # Nothing to go on: say "vm", the conservative claim (bare metal is a promise).
    return MachineType.VM, "default", "unknown"


def _build_types(probe: HostProbe) -> tuple[str, ...]:
    if probe.which("bwrap") is None:
        return ()
    types = []
    if probe.which("rpmbuild") is not None:
        types.append("rpm")
    if probe.which("make") is not None:
        types.append("make")
    # Buildroots (design item 12): dnf --installroot plus the sandbox. mock is not
    # supported yet, so "rpm.mock" is never detected.
    if "rpm" in types and all(probe.which(t) is not None for t in ("dnf", "createrepo_c")):
        types.append("rpm.dnf")
    return tuple(sorted(types))


def detect(work_dir: Path, probe: HostProbe | None = None) -> Detected:
    """Detect this machine's capability values (see the module doc). Never raises for a
    missing or odd source; unknown values become ``unknown`` or 0."""
    probe = probe if probe is not None else HostProbe()
    os_name, pretty = os_token(_read(probe.os_release))
    cpuinfo = _read(probe.cpuinfo)
    machine, source, virt = _machine(probe, cpuinfo)
    cpus = probe.cpu_count() or 1
    try:
        free = probe.disk_free(work_dir)
    except OSError:
        free = 0
    return Detected(
        arch=_token(probe.machine()),
        os=os_name,
        cpus=max(1, min(int(cpus), 4095)),
        cpu_model=_cpu_model(cpuinfo),
        memory_mb=_memory_mb(_read(probe.meminfo)),
        disk_mb=min(free // (1024 * 1024), 2**32 - 1),
        machine=machine,
        machine_source=source,
        build_types=_build_types(probe),
        notes=(("os_pretty", pretty), ("virt", virt)),
    )


def apply_overrides(detected: Detected, overrides: CapabilityOverrides) -> Detected:
    """``detected`` with every value the configuration sets replaced by it."""
    changes = {
        name: value
        for name in DETECTED_FIELDS
        if (value := getattr(overrides, name)) is not None
    }
    if "machine" in changes:
        changes["machine_source"] = "config"
    return attrs.evolve(detected, **changes)
