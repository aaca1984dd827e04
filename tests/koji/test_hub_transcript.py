"""The test hub against the traffic recorded from a real Koji 1.35 hub.

Every call of ``../shared/koji/hub-transcript.jsonl`` is replayed in order, over HTTP, with
the recorded method, parameters, query string and session headers (our session ids and
keys in place of the recorded ones, our uploaded bytes in place of files the transcript
only sizes). Each answer must have the recorded shape: the same fault code, or a result
of the same type whose dicts have the same keys. Then the wire rules the transcript does
not show: callnum order (1008, 1009), expired sessions (1007), GET refused, a missing
metadata key (fault 1), and the real client's re-login on AuthExpired.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import xmlrpc.client
from pathlib import Path
from typing import Any

import koji
import pytest
import requests

from p2pbuild.testing import write_srpm
from p2pbuild.testing._kojihub import KojiTestHub, seed_hub

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[3] / "shared" / "koji"
TRANSCRIPT = SHARED / "hub-transcript.jsonl"
needs_transcript = pytest.mark.skipif(not TRANSCRIPT.exists(), reason="no recorded transcript")


def make_files(tmp: Path) -> dict[str, bytes]:
    """The uploads of the recorded flow: a real hello-p2p-1.0-5 SRPM and binary RPM, a log
    and the CG metadata for them (built from the example the real hub accepted)."""
    srpm = write_srpm(tmp / "src", name="hello-p2p", release="5", noarch=True,
                      build="true", install="install -D -m 0644 README "
                      "%{buildroot}/usr/share/hello-p2p/README",
                      files=["/usr/share/hello-p2p/README"])
    top = tmp / "top"
    subprocess.run(["rpmbuild", "--rebuild", "--nodeps", "--define", f"_topdir {top}",
                    str(srpm.path)], check=True, capture_output=True)
    binary = next((top / "RPMS").rglob("*.rpm")).read_bytes()
    files = {"hello-p2p-1.0-5.src.rpm": srpm.path.read_bytes(),
             "hello-p2p-1.0-5.x86_64.rpm": binary, "build.log": b"ok\n"}
    metadata = json.loads((SHARED / "cg-metadata-example.json").read_text())
    # The reserved build (CGInitBuild answered 7 for task 10), which the hub wants named
    # with the token; the recorded import shows the task and owner the metadata gave.
    metadata["build"].update(release="5", source="git+https://src.example.org/rpms/"
                             "hello-p2p.git#r5", extra={"typeinfo": {"rpm": None}},
                             build_id=7, task_id=10, owner="plainuser")
    for out in metadata["output"]:
        out["filename"] = out["filename"].replace("1.0-6", "1.0-5")
        data = files[out["filename"]]
        out.update(filesize=len(data), checksum=hashlib.sha256(data).hexdigest())
    files["metadata.json"] = json.dumps(metadata).encode()
    return files


def seed_like_transcript(data: Path) -> None:
    seed_hub(
        data,
        users={"kojiadmin": "", "other": "", "plainuser": "pp",
               "p2p-gw.example.org": "hostpass"},
        hosts={"p2p-gw.example.org": "x86_64"},
        channels=("default", "createrepo", "c3", "c4", "c5", "c6", "c7", "c8", "p2p"),
        targets={"f40-p2p": ("f40-build", "f40")},
        cg={"p2p-build": ("p2p-gw.example.org",)},
        # The recorded hub had the package on f40's list: its host.tagBuild succeeded.
        packages={"f40": ("hello-p2p",)},
    )
    # Ids as on the recorded hub: the next task is 10, the next build 7.
    state_file = data / "hub-state.json"
    state = json.loads(state_file.read_text())
    state["next"].update(tasks=10, builds=7)
    state_file.write_text(json.dumps(state))


def shape_errors(recorded: Any, ours: Any, where: str) -> list[str]:
    if recorded is None:
        return [] if ours is None else [f"{where}: {ours!r} where the hub said None"]
    if type(recorded) is not type(ours):
        return [f"{where}: {type(ours).__name__} where the hub gave {type(recorded).__name__}"]
    if isinstance(recorded, dict):
        if set(recorded) != set(ours):
            return [f"{where}: keys differ: only hub {sorted(set(recorded) - set(ours))}, "
                    f"only ours {sorted(set(ours) - set(recorded))}"]
        errors = []
        for key in recorded:
            if isinstance(recorded[key], dict):
                errors += shape_errors(recorded[key], ours[key], f"{where}.{key}")
        return errors
    if isinstance(recorded, list) and recorded and ours:
        return shape_errors(recorded[0], ours[0], f"{where}[0]")
    return []


@needs_transcript
@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="needs rpmbuild")
def test_replay_recorded_traffic(tmp_path: Path) -> None:
    files = make_files(tmp_path)
    seed_like_transcript(tmp_path / "hub")
    records = [json.loads(line) for line in TRANSCRIPT.read_text().splitlines() if line]
    sessions: dict[str, dict[str, Any]] = {}
    tokens: dict[str, str] = {}
    errors: list[str] = []
    with KojiTestHub(tmp_path / "hub") as hub, requests.Session() as http:
        for index, record in enumerate(records):
            headers = {k: v for k, v in record["headers"].items()
                       if k not in ("Content-Length", "Content-length")}
            sid = headers.get("Koji-Session-Id")
            if sid is not None:
                ours = sessions[sid]
                headers["Koji-Session-Id"] = str(ours["session-id"])
                headers["Koji-Session-Key"] = ours["session-key"]
            url = f"http://127.0.0.1:{hub.port}{record['path']}"
            if record["method"].startswith("rawUpload"):
                body = files[record["query"]["filename"]]
                response = http.post(url, params=record["query"], data=body, headers=headers)
            else:
                params = json.loads(json.dumps(record["params"]))
                if record["method"] in ("CGImport",):
                    params[-1]["token"] = tokens.get(params[-1]["token"], params[-1]["token"])
                body = xmlrpc.client.dumps(tuple(params), record["method"], allow_none=True)
                response = http.post(url, data=body.encode(), headers=headers)
            assert response.status_code == 200
            where = f"#{index} {record['method']}"
            try:
                (result,), _ = xmlrpc.client.loads(response.content, use_builtin_types=True)
            except xmlrpc.client.Fault as fault:
                if "fault" not in record:
                    errors.append(f"{where}: fault {fault.faultCode} {fault.faultString}")
                elif fault.faultCode != record["fault"]["faultCode"]:
                    errors.append(f"{where}: fault {fault.faultCode}, hub said "
                                  f"{record['fault']['faultCode']}")
                continue
            if "fault" in record:
                errors.append(f"{where}: {result!r}, hub said fault {record['fault']}")
                continue
            if record["method"] == "login":
                sessions[str(record["result"]["session-id"])] = result
            if record["method"] == "CGInitBuild":
                tokens[record["result"]["token"]] = result["token"]
                assert result["build_id"] == record["result"]["build_id"]
            if record["method"] == "build":
                assert result == record["result"]
            errors += shape_errors(record["result"], result, where)
        state = hub.snapshot()
    assert not errors, "\n".join(errors)
    assert len(records) == 47
    assert state["builds"]["7"]["state"] == koji.BUILD_STATES["COMPLETE"]
    imported = next(r["result"] for r in records if r["method"] == "CGImport" and "result" in r)
    assert state["builds"]["7"]["task_id"] == imported["task_id"] == 10
    assert state["builds"]["7"]["owner_id"] == imported["owner_id"]
    assert state["tasks"]["10"]["state"] == koji.TASK_STATES["CLOSED"]
    assert state["tagged"]["1"] == [7]


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    seed_like_transcript(tmp_path / "hub")
    with KojiTestHub(tmp_path / "hub") as running:
        yield running


def test_wire_rules_the_transcript_does_not_show(hub: KojiTestHub) -> None:
    assert requests.get(hub.url).status_code == 405
    session = koji.ClientSession(hub.url, {"user": "plainuser", "password": "pp"})
    session.login()
    assert session.getLoggedInUser()["name"] == "plainuser"
    headers = {"Koji-Session-Id": str(session.sinfo["session-id"]),
               "Koji-Session-Key": session.sinfo["session-key"],
               "Content-Type": "text/xml"}
    body = xmlrpc.client.dumps((), "getLoggedInUser").encode()

    def call(callnum: int) -> int | None:
        response = requests.post(hub.url, data=body,
                                 headers={**headers, "Koji-Session-Callnum": str(callnum)})
        try:
            xmlrpc.client.loads(response.content)
        except xmlrpc.client.Fault as fault:
            return int(fault.faultCode)
        return None

    assert call(50) is None
    assert call(50) == koji.RetryError.faultCode  # 1009: the same callnum again
    assert call(49) == koji.SequenceError.faultCode  # 1008: going down
    # An expired session: the raw fault is 1007; the real client logs in again by itself.
    session.callnum = 51
    hub.dispatch("testhub.expireSessions", [], {}, None)
    assert call(60) == koji.AuthExpired.faultCode
    assert session.getLoggedInUser()["name"] == "plainuser"
    # Host calls need the host's exclusive session.
    with pytest.raises(koji.AuthError):
        session.host.getID()
    host = koji.ClientSession(hub.url, {"user": "p2p-gw.example.org", "password": "hostpass"})
    host.login()
    with pytest.raises(koji.AuthError, match="exclusive"):
        host.host.getID()
    host.exclusiveSession(force=True)
    assert host.host.getID() == 1
    # A missing metadata key is a plain fault 1, like the hub's KeyError.
    reserved = host.CGInitBuild("p2p-build", {"name": "x", "version": "1", "release": "1"})
    with pytest.raises(xmlrpc.client.Fault) as missing:
        host.CGImport(json.dumps({"metadata_version": 0, "build": {"name": "x"}}), "nowhere",
                      token=reserved["token"])
    assert missing.value.faultCode == 1
    assert not isinstance(missing.value, koji.GenericError)
    # Offline: ServerOffline (1014).
    hub.dispatch("testhub.setOffline", [True], {}, None)
    with pytest.raises(koji.ServerOffline):
        host.getKojiVersion()
