"""Capability detection on this machine, on described machines, and config overrides."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

from p2pbuild import Capability, MachineType
from p2pbuild.node import CapabilityOverrides, HostProbe, apply_overrides, detect
from p2pbuild.node._detect import os_token


def test_this_machine_gives_plausible_values(tmp_path: Path) -> None:
    found = detect(tmp_path)
    assert found.arch == platform.machine().lower()
    assert found.cpus == len(os.sched_getaffinity(0))
    assert found.cpu_model and found.cpu_model != ""
    assert 64 < found.memory_mb < 2**32
    assert 0 < found.disk_mb <= shutil.disk_usage(tmp_path).total >> 20
    assert found.machine in (MachineType.VM, MachineType.METAL)
    if shutil.which("rpmbuild") and shutil.which("bwrap"):
        assert "rpm" in found.build_types
    if Path("/etc/os-release").exists():
        assert (found.os != "unknown" and "-" in found.os) or found.os.isalnum()
    # Everything detected fits a capability record.
    Capability(
        arch=found.arch, os=found.os, cpus=found.cpus, cpu_model=found.cpu_model,
        memory_mb=found.memory_mb, disk_mb=found.disk_mb, machine=found.machine,
        build_types=found.build_types, pools=(),
    )  # fmt: skip


def test_os_release_token() -> None:
    assert os_token('NAME="Fedora Linux"\nID=fedora\nVERSION_ID=41\n')[0] == "fedora-41"
    rhel = 'ID="rhel"\nVERSION_ID="9.4"\nPRETTY_NAME="RHEL 9.4"'
    assert os_token(rhel) == ("rhel-9.4", "RHEL 9.4")
    assert os_token("ID=arch\n")[0] == "arch"
    assert os_token("")[0] == "linux"
    assert os_token("ID=\"Weird Name!\"\nVERSION_ID=1")[0] == "weird-name-1"


def _machine(tmp_path: Path, **kwargs: object) -> HostProbe:
    (tmp_path / "cpuinfo").write_text(str(kwargs.pop("cpuinfo", "model name : Test CPU\n")))
    dmi = tmp_path / "dmi"
    dmi.mkdir(exist_ok=True)
    for name, value in dict(kwargs.pop("dmi", {})).items():  # type: ignore[call-overload]
        (dmi / name).write_text(value)
    tools = set(kwargs.pop("tools", ()))  # type: ignore[call-overload]
    virt = kwargs.pop("virt", None)

    def run(argv: Sequence[str]) -> tuple[int, str] | None:
        assert argv[0] == "systemd-detect-virt"
        return (0, f"{virt}\n") if virt != "none" else (1, "none\n")

    return HostProbe(
        os_release=tmp_path / "os-release", cpuinfo=tmp_path / "cpuinfo",
        meminfo=tmp_path / "meminfo", dmi_dir=dmi, machine=lambda: "s390x",
        cpu_count=lambda: 8, run=run, disk_free=lambda _: 50 << 30,
        which=lambda name: f"/usr/bin/{name}" if name in tools else None,
    )  # fmt: skip


def test_vm_or_metal_from_each_source(tmp_path: Path) -> None:
    with_virt = _machine(tmp_path, tools={"systemd-detect-virt"}, virt="kvm")
    assert detect(tmp_path, with_virt).machine is MachineType.VM
    assert detect(tmp_path, with_virt).machine_source == "systemd-detect-virt"
    metal = _machine(tmp_path, tools={"systemd-detect-virt"}, virt="none")
    assert detect(tmp_path, metal).machine is MachineType.METAL
    flag = _machine(tmp_path, cpuinfo="flags : fpu sse hypervisor\n")
    assert (detect(tmp_path, flag).machine, detect(tmp_path, flag).machine_source) == (
        MachineType.VM, "cpu-flag")
    dmi_vm = _machine(tmp_path, cpuinfo="flags : fpu\n", dmi={"sys_vendor": "QEMU\n"})
    assert detect(tmp_path, dmi_vm).machine is MachineType.VM
    dmi_metal = _machine(tmp_path, cpuinfo="flags : fpu\n", dmi={"sys_vendor": "Dell Inc.\n"})
    assert detect(tmp_path, dmi_metal).machine is MachineType.METAL


def test_described_machine_and_overrides_win(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text("ID=fedora\nVERSION_ID=41\n")
    (tmp_path / "meminfo").write_text("MemTotal:       16384000 kB\n")
    probe = _machine(tmp_path, tools={"bwrap", "rpmbuild"})
    found = detect(tmp_path, probe)
    assert (found.arch, found.os, found.cpus, found.cpu_model) == (
        "s390x", "fedora-41", 8, "Test CPU")
    assert found.memory_mb == 16000 and found.disk_mb == 50 * 1024
    assert found.build_types == ("rpm",)  # make is not installed
    assert detect(tmp_path, _machine(tmp_path, tools={"rpmbuild"})).build_types == ()  # no bwrap
    overridden = apply_overrides(found, CapabilityOverrides(
        arch="x86_64", os="rhel-9", cpus=2, memory_mb=1, machine=MachineType.METAL,
        build_types=("make",),
    ))  # fmt: skip
    assert (overridden.arch, overridden.os, overridden.cpus, overridden.memory_mb) == (
        "x86_64", "rhel-9", 2, 1)
    assert overridden.machine is MachineType.METAL and overridden.machine_source == "config"
    assert overridden.build_types == ("make",)
    assert overridden.cpu_model == "Test CPU"  # not overridden: detected


def test_dnf_and_createrepo_c_add_the_buildroot_method(tmp_path: Path) -> None:
    tools = {"bwrap", "rpmbuild", "make", "dnf", "createrepo_c"}
    assert detect(tmp_path, _machine(tmp_path, tools=tools)).build_types == (
        "make", "rpm", "rpm.dnf"
    )
    without = detect(tmp_path, _machine(tmp_path, tools=tools - {"createrepo_c"}))
    assert without.build_types == ("make", "rpm")


def test_detected_capability_fields_are_one_list() -> None:
    import attrs

    from p2pbuild import Capability
    from p2pbuild._records import DETECTED_FIELDS
    from p2pbuild.node._config import CapabilityOverrides
    from p2pbuild.node._detect import Detected

    # Detection, the configuration's overrides and the record name the same fields.
    assert {f.name for f in attrs.fields(CapabilityOverrides)} == set(DETECTED_FIELDS)
    assert set(DETECTED_FIELDS) <= {f.name for f in attrs.fields(Detected)}
    assert set(DETECTED_FIELDS) <= {f.name for f in attrs.fields(Capability)}
