"""A small Koji hub for tests: XML-RPC over HTTP and HTTPS on loopback, files on disk.

No Koji hub is packaged on PyPI or Debian, so the dispatcher's Koji integration is tested
against this one, driven by the real ``koji`` client library and command line. It copies
what ``../shared/koji/hub-transcript.jsonl`` recorded from a real Koji 1.35 hub for the
calls a build host, the ``koji build`` command and a content generator make:

* POST only on ``/kojihub`` (and ``/kojihub/ssllogin`` for ``sslLogin``). A body with
  ``Content-Type: application/octet-stream`` is a raw upload whose parameters are in the
  query string; anything else is XML-RPC (``koji.xmlrpcplus``; keyword arguments travel as a
  trailing struct with ``__starstar``). ``GET /kojifiles/<path>`` serves the hub's files
  (``work/`` uploads, ``packages/`` imported builds), like Koji's ``topurl``.
* Session headers ``Koji-Session-Id``/``-Key``/``-Callnum``: a callnum lower than the last is
  fault 1008, the same one again 1009 (except Koji's retry whitelist); an expired session
  is 1007 (the client logs in again by itself with ``renew``, keeping session id, master and
  exclusivity); ``host.*`` needs an exclusive session (a subsession of one counts).
* Faults: ``koji.GenericError`` subclasses travel with their ``faultCode`` (1000-1024);
  anything else, e.g. a missing metadata key, is fault 1 with the exception's text.
* ``CGImport`` validates like the hub: every required key, a reserved build named by
  ``build_id`` with its token (CG, owning task, ``BUILDING``, NVR checked), sizes and
  checksums recomputed, each RPM's header (``SOURCERPM`` of binaries, NVR of the source
  package) against the build, every buildroot referenced by an output; nothing is recorded
  unless all pass. The build's task and owner come from the metadata, as on the hub.
  ``cancelBuild`` (the owner or an admin) cancels a ``BUILDING`` build, its task and its
  reservation.
* Tasks: ``build`` puts a task in the channel the target policy picks (``*-p2p`` -> ``p2p``
  by default), ``host.getTasks`` assigns free tasks of the host's channels to it (a host
  that refused a task does not get it again), ``cancelTask`` cancels, ``freeTask`` (admin)
  frees.

State (users, hosts, channels, tags, targets, builds, tasks, sessions) is one JSON file in
the data directory, written atomically after every call that changes it, so a hub stopped
or killed between calls restarts on the same directory with everything it had answered.
Test controls are XML-RPC methods under ``testhub.`` (expire sessions, go offline, expire
or crash when a given method arrives, list refusals and calls).

Run as a process: ``python -m p2pbuild.testing._kojihub DATA_DIR [--port N] [--https-port N]``
prints one JSON line with its URLs once it listens.

Module size: one hub, one concept; the session rules, task states and the CG validation
share the state and its lock.
"""

from ._hub import KojiTestHub
from ._pki import HubPki, make_hub_pki
from ._process import HubProcess, main, write_koji_cli_config
from ._state import seed_hub

__all__ = [
    "HubPki",
    "HubProcess",
    "KojiTestHub",
    "main",
    "make_hub_pki",
    "seed_hub",
    "write_koji_cli_config",
]
