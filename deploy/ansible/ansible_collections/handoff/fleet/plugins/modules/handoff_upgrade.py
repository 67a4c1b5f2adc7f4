#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the handoff contributors
# SPDX-License-Identifier: MIT OR Apache-2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: handoff_upgrade
short_description: Upgrade a service run by C(handoff run) to a build with zero downtime, or roll it back
version_added: "0.1.0"
description:
  - Replaces the process of a service supervised by C(handoff run) on the host with a new build,
    through the supervisor (C(handoff upgrade --json)); the new process takes over the listening
    sockets and the old one drains, so no connection is refused or lost. If the new build fails to
    start or fails its health check, the upgrade aborts and the old process serves on.
  - Idempotent. Which build a host runs is told by the SHA-256 of the executable the service
    process runs, which C(handoff status --json) reports (C(incumbent_exe_sha256)); a host whose
    service already runs the bytes of O(build) reports C(ok), not C(changed).
  - Keeps a record per service (a small JSON file, mode 0600, in O(record_dir)) of the build that
    ran before the latest upgrade it attempted, so O(state=rolled_back) can take the host back to it.
  - O(state=prepared) starts the new build ahead and holds it (C(handoff upgrade --prepare)); the
    next O(state=upgraded) of the same O(build) then only hands over.
options:
  runtime_dir:
    description:
      - The supervisor's C(--runtime-dir) (where its C(admin.sock) is).
    type: path
    required: true
  state:
    description:
      - V(upgraded) makes the service run O(build), upgrading it if it runs anything else.
      - V(prepared) starts O(build) and holds it for the next upgrade, leaving the running process
        untouched; C(ok) if that build already runs or is already held.
      - V(rolled_back) makes the service run the build that ran before the latest upgrade this module
        attempted on it (recorded in O(record_dir)). With O(build) set, only an attempt to go to
        O(build) is undone; a host where none was made reports C(ok). Rolling back again is C(ok).
    type: str
    choices: [upgraded, prepared, rolled_back]
    default: upgraded
  build:
    description:
      - Path on the host of the build to run, the service's executable itself (an ELF binary; for
        a wrapper script, the bytes compared are those of the program it C(exec)s, so such a build
        never reads as already running).
      - Required with O(state=upgraded) and O(state=prepared). Put it there first, e.g. with
        M(ansible.builtin.copy) into a directory per release.
    type: path
  link:
    description:
      - The path C(handoff run) was given as its program, when it is a symbolic link to the current
        release (C(handoff run ... -- /opt/app/current)). The module points it at O(build) (atomically,
        by a rename) before handing over, and back if the upgrade does not commit, so a crash restart
        of the service and a plain C(handoff upgrade) start the same build as this module did.
      - The upgrade spawns O(build) by its own path (C(--binary)) either way. Without O(link), a crash
        restart of the service starts the program C(handoff run) was given, whatever build ran.
    type: path
  handoff:
    description:
      - The C(handoff) command on the host, a path or a name looked up in C(PATH).
    type: str
    default: handoff
  deadline:
    description:
      - Overall budget of the upgrade, from its start to the new process being ready
        (C(handoff upgrade --deadline), e.g. V(30s)); by default the supervisor's.
    type: str
  drain_grace:
    description:
      - Budget for the old process to finish its connections (C(--drain-grace), e.g. V(10s)).
    type: str
  wait:
    description:
      - If another upgrade of the service is in flight, wait this long for it to end and then upgrade
        (C(--wait), e.g. V(2m)), instead of failing with "another handoff is in progress".
    type: str
  record_dir:
    description:
      - Directory the module owns (created mode 0700) for its record of each service's previous
        build, one file per O(runtime_dir). Keep it on persistent storage; the runtime dir usually
        is not.
    type: path
    default: ~/.local/state/handoff-fleet
notes:
  - Supports check mode (nothing is started, written or re-linked) and diff mode.
  - Runs on the host, as the user that runs C(handoff run) (or root), the only users the
    supervisor answers. Needs a C(handoff) whose C(status --json) reports C(incumbent_exe_sha256), and Linux.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
requirements:
  - C(handoff) 0.1.0 or later on the host, with its supervisor running the service
author:
  - the handoff contributors
"""

EXAMPLES = r"""
- name: Put the release on the host
  ansible.builtin.copy:
    src: "build/{{ release }}/kv"
    dest: "/opt/kv/releases/{{ release }}/kv"
    mode: "0755"

- name: Start it ahead, while the old build serves
  handoff.fleet.handoff_upgrade:
    runtime_dir: /run/kv
    build: "/opt/kv/releases/{{ release }}/kv"
    state: prepared

- name: Hand over to it (ok if the host runs it already)
  handoff.fleet.handoff_upgrade:
    runtime_dir: /run/kv
    build: "/opt/kv/releases/{{ release }}/kv"
    link: /opt/kv/current          # handoff run ... -- /opt/kv/current
    deadline: 60s
  register: upgrade

- name: Show the phases
  ansible.builtin.debug:
    msg: "{{ upgrade.phases | map(attribute='phase') | zip(upgrade.phases | map(attribute='took_ms')) }}"

- name: Undo that upgrade (ok if it never happened here)
  handoff.fleet.handoff_upgrade:
    runtime_dir: /run/kv
    state: rolled_back
    build: "/opt/kv/releases/{{ release }}/kv"
    link: /opt/kv/current
"""

RETURN = r"""
msg:
  description: What was done, in words.
  returned: always
  type: str
  sample: "upgraded: pid 1234 -> 1240 (kv/2.0.0) in 2.41 ms"
build:
  description: The build asked for (O(state=rolled_back)- the build rolled back to), with its SHA-256.
  returned: when known
  type: dict
  sample: {"path": "/opt/kv/releases/v2/kv", "sha256": "f710...a1e0"}
previous:
  description: The build that ran before the latest upgrade attempted here, as recorded; null if the
    running build could not be found as a file (e.g. replaced on disk), then no rollback is possible.
  returned: when known
  type: dict
  sample: {"path": "/opt/kv/releases/v1/kv", "sha256": "9c3e...02bd"}
running:
  description: The service process after the task, as C(handoff status) reports it.
  returned: always, but on a failure to reach the supervisor
  type: dict
  sample: {"pid": 1240, "exe": "/opt/kv/releases/v2/kv", "sha256": "f710...a1e0", "build_id": "kv/2.0.0"}
handoff_id:
  description: The handoff's id, as the supervisor's journal and log name it.
  returned: when an upgrade or prepare ran
  type: str
  sample: "0x3f2a9c1e5b7d4e60"
old_pid:
  description: The process that was replaced.
  returned: when an upgrade committed
  type: int
new_pid:
  description: The process that serves now (the held process, for O(state=prepared)).
  returned: when an upgrade committed or a prepare succeeded
  type: int
build_id:
  description: What the new process says it is.
  returned: when an upgrade committed or a prepare succeeded
  type: str
total_ms:
  description: Duration of the handoff, from the request to the commit (prepare- to the new build's
    greeting).
  returned: when an upgrade committed or a prepare succeeded
  type: float
phases:
  description: Each phase of the handoff as it ended, in order, with how long it took.
  returned: when an upgrade or prepare ran
  type: list
  elements: dict
  sample: [{"phase": "negotiating", "took_ms": 1.31}, {"phase": "draining", "took_ms": 0.15}]
prepared_for_ms:
  description: The upgrade handed over to a process started ahead by O(state=prepared), held this long.
  returned: when such a process was used
  type: float
connections_moved:
  description: Live connections handed to the new process (their clients did not reconnect).
  returned: when the supervisor reports it
  type: int
connections_closed:
  description: Connections the old process closed instead of moving.
  returned: when the supervisor reports it
  type: int
reason:
  description: Why the upgrade aborted or was not attempted (the old process serves on).
  returned: on failure of the upgrade
  type: str
  sample: "the successor's health check failed: ..."
aborted_phase:
  description: The phase the upgrade aborted in.
  returned: when an upgrade aborted in a known phase
  type: str
exit_code:
  description: Exit status of C(handoff upgrade) - 0 committed, 1 aborted, 2 nothing attempted.
  returned: when an upgrade or prepare ran
  type: int
events:
  description: Every JSON event C(handoff upgrade --json) printed, in order.
  returned: when an upgrade or prepare ran
  type: list
  elements: dict
record:
  description: The file where the module keeps this service's previous build.
  returned: always
  type: str
"""

import hashlib
import json
import os
import re
import stat
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule

RECORD_VERSION = 1
# How long to wait for the supervisor to hash a build it just started.
DIGEST_WAIT = 60


class Failure(Exception):
    """A failure to report with fail_json: a message and result fields."""

    def __init__(self, msg, **fields):
        super(Failure, self).__init__(msg)
        self.msg = msg
        self.fields = fields


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


class Handoff(object):
    """Talks to one supervisor through the `handoff` command."""

    def __init__(self, module):
        self.module = module
        self.runtime_dir = os.path.abspath(module.params["runtime_dir"])
        name = module.params["handoff"]
        if os.sep in name:
            path = os.path.expanduser(name)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise Failure(
                    "handoff=%s is not an executable file on this host: set `handoff` to the path of "
                    "the handoff command the supervisor runs" % name
                )
        else:
            path = module.get_bin_path(name, required=False)
            if not path:
                raise Failure(
                    "no `%s` command in the PATH of this host: install handoff or set `handoff` "
                    "to its path" % name
                )
        self.bin = path

    def run(self, args):
        """Runs `handoff ARGS`; returns (exit code, JSON events, stderr)."""
        rc, out, err = self.module.run_command([self.bin] + args, check_rc=False)
        events = []
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                events.append(ev)
        return rc, events, err.strip()

    def status(self):
        """`handoff status --json`, once it names the digest of what runs: the
        supervisor hashes a new build in the background (a status never waits
        for it), so right after an upgrade the digest may be absent a moment."""
        deadline = time.time() + DIGEST_WAIT
        while True:
            st = self.status_once()
            if st.get("incumbent_exe_sha256") or not st.get("incumbent_exe") or time.time() > deadline:
                return self.checked(st)
            time.sleep(0.2)

    def status_once(self):
        rc, events, err = self.run(["status", "--runtime-dir", self.runtime_dir, "--json"])
        last = events[-1] if events else {}
        if rc != 0 or last.get("event") != "status":
            why = last.get("message") if last.get("event") == "error" else (err or "no answer")
            why = " ".join(why.split())
            if not why.endswith(("?", ".")):
                why += "."
            if "running?" not in why:
                why += " Is `handoff run --runtime-dir %s` running?" % self.runtime_dir
            raise Failure(
                "`handoff status --runtime-dir %s` failed (exit %s): %s The task must run as the "
                "user of `handoff run` (or root): the supervisor answers no one else."
                % (self.runtime_dir, rc, why)
            )
        if last.get("incumbent_pid") is None:
            raise Failure(
                "no service process runs under the supervisor at %s right now (it is starting, or "
                "restarting the service after a crash): retry once `handoff status` shows an incumbent"
                % self.runtime_dir
            )
        return last

    def checked(self, last):
        if last.get("incumbent_exe") and not last.get("incumbent_exe_sha256"):
            raise Failure(
                "the supervisor at %s did not finish hashing the executable its service runs (%s) "
                "within %d s: is its disk that slow? Retry" % (self.runtime_dir, last["incumbent_exe"], DIGEST_WAIT)
            )
        if not last.get("incumbent_exe_sha256"):
            raise Failure(
                "the supervisor at %s does not say which executable its service runs "
                "(`handoff status --json` has no incumbent_exe_sha256): its handoff is older than this "
                "module, or the host is not Linux. Put a newer handoff binary in place and run "
                "`handoff upgrade --supervisor --runtime-dir %s` (the service keeps running), then retry"
                % (self.runtime_dir, self.runtime_dir)
            )
        return last

    def upgrade(self, build, prepare=False):
        p = self.module.params
        args = ["upgrade", "--runtime-dir", self.runtime_dir, "--json", "--binary", build]
        if prepare:
            args.append("--prepare")
        else:
            for opt in ("deadline", "drain_grace", "wait"):
                if p[opt]:
                    args += ["--" + opt.replace("_", "-"), p[opt]]
        return self.run(args)


def running_of(st):
    return {
        "pid": st.get("incumbent_pid"),
        "exe": st.get("incumbent_exe"),
        "sha256": st.get("incumbent_exe_sha256"),
        "build_id": st.get("build_id"),
    }


def describe_build(path):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise Failure(
            "build %s does not exist on this host (or is not a file): put it there first, e.g. "
            "with ansible.builtin.copy" % path
        )
    if not os.access(path, os.X_OK):
        raise Failure("build %s is not executable: give it mode 0755" % path)
    return {"path": path, "sha256": sha256_file(path)}


def runs(st, build, link):
    """Whether the service runs `build` (and `link`, if any, points at it)."""
    if st.get("incumbent_exe_sha256") != build["sha256"]:
        return False
    return not link or same_file(link, build["path"])


def same_inode(a, b):
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def current_build(st, link):
    """What runs now, as a file an upgrade could go back to; None if it is gone."""
    exe = st.get("incumbent_exe") or ""
    if exe and not exe.endswith(" (deleted)") and os.path.isfile(exe):
        # The very file the process runs (a running executable cannot be written to),
        # else one with the same bytes.
        running = "/proc/%s/exe" % st.get("incumbent_pid")
        if same_inode(exe, running) or sha256_file(exe) == st.get("incumbent_exe_sha256"):
            return {"path": exe, "sha256": st["incumbent_exe_sha256"]}
    if link and os.path.isfile(link):
        target = os.path.realpath(link)
        return {"path": target, "sha256": sha256_file(target)}
    return None


class Record(object):
    """The module's record of one service: the build before the latest attempt."""

    def __init__(self, record_dir, runtime_dir):
        self.dir = os.path.abspath(os.path.expanduser(record_dir))
        tag = hashlib.sha256(runtime_dir.encode("utf-8")).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", runtime_dir.strip("/"))[-64:] or "root"
        self.path = os.path.join(self.dir, "%s-%s.json" % (name, tag))

    def load(self):
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise Failure(
                "the record %s is not a regular file of this user: remove it (the module keeps its own "
                "record there)" % self.path
            )
        try:
            with open(self.path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            raise Failure("cannot read the record %s (%s): remove it to start afresh" % (self.path, e))
        if not isinstance(rec, dict) or rec.get("version") != RECORD_VERSION:
            raise Failure(
                "the record %s is not one this module wrote (version %r): remove it to start afresh"
                % (self.path, rec.get("version") if isinstance(rec, dict) else None)
            )
        return rec

    def save(self, rec):
        rec = dict(rec, version=RECORD_VERSION, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            os.makedirs(self.dir, mode=0o700)
        except OSError:
            pass
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise Failure(
                "record_dir %s must be a directory of this user, not a link, writable by no one else "
                "(chmod 0700 it, or choose another record_dir)" % self.dir
            )
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".record-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(rec, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def point_link(link, target):
    """Makes `link` a symbolic link to `target` in one rename; returns what it pointed to."""
    try:
        old = os.readlink(link)
    except OSError as e:
        raise Failure(
            "link=%s is not a symbolic link (%s): `handoff run` should run the current release "
            "through one (ln -s RELEASE %s), or leave `link` unset" % (link, e.strerror, link)
        )
    tmp = "%s.handoff-%d" % (link, os.getpid())
    try:
        os.unlink(tmp)
    except OSError:
        pass
    os.symlink(target, tmp)
    os.rename(tmp, link)
    return old


def phases_of(events):
    return [
        {"phase": e.get("phase"), "took_ms": e.get("took_ms")}
        for e in events
        if e.get("event") == "phase"
    ]


def final_event(events, kinds):
    for e in reversed(events):
        if e.get("event") in kinds:
            return e
    return {}


def hand_over(module, hd, st, build, link):
    """Upgrades the service to `build`: returns result fields, or raises Failure."""
    old_target = point_link(link, build["path"]) if link else None
    rc, events, err = hd.upgrade(build["path"])
    final = final_event(events, ("committed", "aborted", "error"))
    result = {"exit_code": rc, "events": events, "phases": phases_of(events)}
    if rc == 0 and final.get("event") == "committed":
        for w in final.get("warnings") or []:
            module.warn("handoff upgrade: %s" % w)
        for k in ("handoff_id", "old_pid", "new_pid", "build_id", "total_ms", "prepared_for_ms",
                  "connections_moved", "connections_closed"):
            if k in final:
                result[k] = final[k]
        return result
    if link:
        point_link(link, old_target)
    after = None
    try:
        after = running_of(hd.status())
    except Failure:
        pass
    if rc == 1:
        reason = final.get("reason") or err or "no reason given"
        where = " in phase %s" % final["phase"] if final.get("phase") else ""
        raise Failure(
            "the upgrade to %s aborted%s: %s. The previous build serves on (pid %s); fix the build, "
            "or roll back the hosts upgraded with it (state=rolled_back)"
            % (build["path"], where, reason, (after or {}).get("pid", "?")),
            reason=reason,
            aborted_phase=final.get("phase"),
            handoff_id=final.get("handoff_id"),
            running=after,
            **result
        )
    reason = final.get("message") or err or "no output"
    raise Failure(
        "`handoff upgrade` attempted nothing (exit %s): %s. The service is untouched%s"
        % (rc, reason, "; retry with `wait` set if another upgrade was in flight" if "in progress" in reason else ""),
        reason=reason,
        running=after,
        **result
    )


def diff_of(st, build):
    return {
        "before": "runs %s (sha256 %s)\n" % (st.get("incumbent_exe"), st.get("incumbent_exe_sha256")),
        "after": "runs %s (sha256 %s)\n" % (build["path"], build["sha256"]),
    }


def verify(module, hd, build, result):
    """Reads the status after a commit; warns when the service runs other bytes than `build`."""
    try:
        st = hd.status()
    except Failure as f:
        module.warn("the upgrade committed, but the status read afterwards failed: %s" % f.msg)
        result["running"] = None
        return
    result["running"] = running_of(st)
    if st.get("incumbent_exe_sha256") != build["sha256"]:
        module.warn(
            "the service now runs %s (sha256 %s), not the bytes of %s: a wrapper script? Such a build "
            "is upgraded to again at every run" % (st.get("incumbent_exe"), st.get("incumbent_exe_sha256"), build["path"])
        )


def upgraded(module, hd, record):
    p = module.params
    link = p["link"]
    build = describe_build(p["build"])
    st = hd.status()
    result = {"build": build, "running": running_of(st), "record": record.path}
    if runs(st, build, link):
        return dict(result, changed=False, msg="already runs %s (pid %s)" % (build["path"], st["incumbent_pid"]))
    previous = current_build(st, link)
    result["previous"] = previous
    if module._diff:
        result["diff"] = diff_of(st, build)
    if module.check_mode:
        return dict(result, changed=True, msg="would upgrade pid %s to %s" % (st["incumbent_pid"], build["path"]))
    if previous is None:
        module.warn(
            "the running build %s is no longer on disk as it runs: no rollback will be possible to it"
            % st.get("incumbent_exe")
        )
    rec = {"runtime_dir": hd.runtime_dir, "previous": previous, "target": build, "outcome": "started"}
    record.save(rec)
    try:
        result.update(hand_over(module, hd, st, build, link))
    except Failure as f:
        record.save(dict(rec, outcome="aborted" if f.fields.get("exit_code") == 1 else "not-attempted"))
        f.fields.update(build=build, previous=previous, record=record.path)
        raise
    record.save(dict(rec, outcome="committed"))
    verify(module, hd, build, result)
    return dict(
        result,
        changed=True,
        msg="upgraded: pid %s -> %s (%s) in %.2f ms" % (
            result.get("old_pid"), result.get("new_pid"), result.get("build_id"), result.get("total_ms") or 0),
    )


def prepared(module, hd, record):
    p = module.params
    build = describe_build(p["build"])
    st = hd.status()
    result = {"build": build, "running": running_of(st), "record": record.path}
    if st.get("incumbent_exe_sha256") == build["sha256"]:
        return dict(result, changed=False, msg="already runs %s: nothing to prepare" % build["path"])
    held = st.get("prepared") or {}
    if held.get("binary") and same_file(held["binary"], build["path"]):
        return dict(result, changed=False, new_pid=held.get("pid"),
                    msg="%s is already started and held (pid %s)" % (build["path"], held.get("pid")))
    if module.check_mode:
        return dict(result, changed=True, msg="would start %s and hold it" % build["path"])
    rc, events, err = hd.upgrade(build["path"], prepare=True)
    final = final_event(events, ("prepared", "aborted", "error"))
    result.update(exit_code=rc, events=events, phases=phases_of(events))
    if rc == 0 and final.get("event") == "prepared":
        result.update(handoff_id=final.get("handoff_id"), new_pid=final.get("pid"),
                      build_id=final.get("build_id"), total_ms=final.get("took_ms"))
        return dict(result, changed=True,
                    msg="prepared: pid %s (%s) held for the next upgrade" % (final.get("pid"), final.get("build_id")))
    reason = final.get("reason") or final.get("message") or err or "no output"
    raise Failure(
        "preparing %s failed (exit %s): %s. The running process was not touched" % (build["path"], rc, reason),
        reason=reason, **result
    )


def rolled_back(module, hd, record):
    p = module.params
    link = p["link"]
    rec = record.load()
    undo = os.path.abspath(p["build"]) if p["build"] else None
    if undo and (rec is None or not same_file(rec["target"]["path"], undo)):
        last = rec["target"]["path"] if rec else None
        return {"changed": False, "record": record.path,
                "msg": "no upgrade to %s was attempted here (last: %s): nothing to roll back" % (undo, last)}
    if rec is None or not rec.get("previous"):
        raise Failure(
            "no previous build is recorded for the service at %s (%s): the module records one each time "
            "it upgrades the service, and the build that ran before could not be kept; nothing to roll back to"
            % (hd.runtime_dir, record.path),
            record=record.path,
        )
    prev = rec["previous"]
    st = hd.status()
    result = {"build": prev, "running": running_of(st), "record": record.path}
    if runs(st, prev, link):
        if rec.get("outcome") != "rolled-back" and not module.check_mode:
            record.save(dict(rec, outcome="rolled-back"))
        return dict(result, changed=False, msg="already runs the previous build %s (pid %s)" % (prev["path"], st["incumbent_pid"]))
    if not os.path.isfile(prev["path"]) or sha256_file(prev["path"]) != prev["sha256"]:
        raise Failure(
            "the previous build %s is gone or was changed on disk since it was recorded (sha256 %s): put it "
            "back, or upgrade to a build of your choice with state=upgraded" % (prev["path"], prev["sha256"]),
            **result
        )
    if module._diff:
        result["diff"] = diff_of(st, prev)
    if module.check_mode:
        return dict(result, changed=True, msg="would roll pid %s back to %s" % (st["incumbent_pid"], prev["path"]))
    result.update(hand_over(module, hd, st, prev, link))
    record.save(dict(rec, outcome="rolled-back"))
    verify(module, hd, prev, result)
    return dict(
        result,
        changed=True,
        msg="rolled back: pid %s -> %s (%s) in %.2f ms" % (
            result.get("old_pid"), result.get("new_pid"), result.get("build_id"), result.get("total_ms") or 0),
    )


def main():
    module = AnsibleModule(
        argument_spec=dict(
            runtime_dir=dict(type="path", required=True),
            state=dict(type="str", default="upgraded", choices=["upgraded", "prepared", "rolled_back"]),
            build=dict(type="path"),
            link=dict(type="path"),
            handoff=dict(type="str", default="handoff"),
            deadline=dict(type="str"),
            drain_grace=dict(type="str"),
            wait=dict(type="str"),
            record_dir=dict(type="path", default="~/.local/state/handoff-fleet"),
        ),
        required_if=[("state", "upgraded", ["build"]), ("state", "prepared", ["build"])],
        supports_check_mode=True,
    )
    try:
        hd = Handoff(module)
        record = Record(module.params["record_dir"], hd.runtime_dir)
        action = {"upgraded": upgraded, "prepared": prepared, "rolled_back": rolled_back}[module.params["state"]]
        result = action(module, hd, record)
    except Failure as f:
        fields = dict(f.fields)
        fields.setdefault("changed", False)
        module.fail_json(msg=f.msg, **fields)
    except OSError as e:
        module.fail_json(msg="%s: %s" % (e.filename or "I/O", e.strerror or e), changed=False)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
