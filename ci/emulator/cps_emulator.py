"""The AWS emulator for the cps bench: moto 5.2.5 plus the AWS behaviour moto lacks.

moto accepts operations that AWS refuses, and the agent's safety depends on those refusals
(AttachVolume is the only lock between agents racing for one volume). This module patches moto in
this process, then serves it on 127.0.0.1. Every patch says which AWS behaviour it restores.

Usage: python cps_emulator.py [--port N] [--attach-delay S] [--create-delay S] [--detach-delay S] [--shutdown-delay S]
Prints one line `cps-emulator listening on 127.0.0.1:PORT` once it accepts requests.
POST /cps/node-policy {"access_key": K, "policy": {...}} restricts requests signed with K to that
IAM policy (actions, resource ARNs, tag conditions), as AWS would; other keys stay unrestricted.
POST /cps/settings {"pending_delay": S, "membership_delay": S} changes, from then on, how long new
group instances stay `Pending` before `Pending:Wait`, and how long DescribeAutoScalingInstances
does not show a new instance yet (eventual consistency early in a boot); with
{"modifying_delay": S, "optimizing_delay": S}, how long volume modifications started from then on
stay `modifying` and `optimizing`. POST /cps/modifications/age {"seconds": S, "volume_id": V}
moves modification start times S into the past (the 6-hour rule, tested without waiting);
with "states": true their states move on too, as if S had passed (a test steps through them);
POST /cps/modifications/fail {"volume_id": V} makes the modification under way fail.
POST /cps/faults {"service": "dynamodb", "action": A, "code": C, "times": N} makes the next N
DynamoDB requests of action A fail with error C (throttling) before they take effect.
DynamoDB (the relocation lock's table) is moto's, with conditional writes made atomic.
With {"snapshot_delay": S}, how long snapshots started from then on stay `pending`; with
{"image_dir": DIR}, where the bench's volume images are: CreateSnapshot copies the source's image
(`DIR/vol-….img`, sparse) to `DIR/snap-….img` before it replies, so the snapshot holds exactly
what the volume held at that moment. POST /cps/snapshots/fail {"snapshot_id": ID} makes a
snapshot fail (`error`).
POST /cps/guests {"instance_id": I} marks an instance as played by a real guest (the VM tier): its
detaches stay `detaching` and its termination `shutting-down` until POST /cps/guests/release
{"volume_id": V} or {"instance_id": I}; {"instance_id": I, "guest": false} forgets the guest and
ends every hold it has.

Auto Scaling states a rolling update must respect are played too: Standby (moto's own), suspended
Launch (no instance launches until it is resumed), TERMINATING lifecycle hooks (the instance waits
in Terminating:Wait, still running with its volumes and interfaces, until the action is completed
or times out), instance refreshes (recorded with their status; the emulator does not replace
instances for them) and mixed-instances overrides that name their own launch template.
"""

import argparse
import base64
import copy
import datetime
import hashlib
import json
import signal
import sys
import threading
import time
import uuid

import moto

PINNED_MOTO = "5.2.5"
if moto.__version__ != PINNED_MOTO:
    sys.exit(
        f"cps_emulator: moto {moto.__version__} found, the patch layer is written for "
        f"{PINNED_MOTO}; run ci/setup to rebuild the venv"
    )

from moto.autoscaling.exceptions import AutoscalingClientError  # noqa: E402
from moto.autoscaling.exceptions import ValidationError as AsgValidationError  # noqa: E402
from moto.autoscaling.models import (  # noqa: E402
    AutoScalingBackend,
    FakeAutoScalingGroup,
    InstanceState,
    TerminateInstanceActivity,
)
from moto.autoscaling.responses import AutoScalingResponse  # noqa: E402
from moto.core.exceptions import AccessDeniedError, JsonRESTError  # noqa: E402
from moto.core.responses import ActionResult, BaseResponse, EmptyResult  # noqa: E402
from moto.dynamodb.responses import DynamoHandler  # noqa: E402
from moto.ec2.exceptions import EC2ClientError  # noqa: E402
from moto.ec2.models.elastic_network_interfaces import NetworkInterfaceBackend  # noqa: E402
from moto.ec2.models.elastic_block_store import (  # noqa: E402
    EBSBackend,
    Snapshot,
    Volume,
    VolumeAttachment,
)
from moto.ec2.models.instances import Instance  # noqa: E402
from moto.ec2.responses.elastic_block_store import ElasticBlockStore  # noqa: E402
from moto.ec2.responses.tags import TagResponse  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.exceptions import HTTPException  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

# moto's threaded server runs requests concurrently and moto itself takes no locks; AWS decides
# check-then-act operations atomically, so the patched ones run under one lock.
LOCK = threading.RLock()


class Timing:
    """Simulated durations of EC2 state transitions (seconds; 0 = immediate, as moto)."""

    attach_delay = 0.0
    create_delay = 0.0
    detach_delay = 0.0
    shutdown_delay = 0.0
    # A new group instance is `Pending` this long before its launch hook holds it in
    # `Pending:Wait` (AWS: the instance launches first; moto: at once).
    pending_delay = 0.0
    # DescribeAutoScalingInstances does not show an instance this long after it joined its group
    # (AWS's eventual consistency early in a boot; moto: at once).
    membership_delay = 0.0
    # A volume modification is `modifying` this long, then `optimizing` this long, then
    # `completed` (AWS: seconds to minutes, then minutes to hours; moto: completed at once).
    modifying_delay = 0.0
    optimizing_delay = 0.0
    # A snapshot is `pending` this long, then `completed` (AWS: minutes; moto: completed at once).
    snapshot_delay = 0.0
    # Where the bench keeps volume images (`vol-….img`): CreateSnapshot copies the source's image
    # to `snap-….img` there before it replies. None: no data plane, snapshots hold no data.
    image_dir = None


def aws_error(code, message):
    return EC2ClientError(code, message)


# --- volume state: "creating" until the create delay has passed ------------------------------

_plain_volume_init = Volume.__init__


def _volume_init(self, *args, **kwargs):
    _plain_volume_init(self, *args, **kwargs)
    self._cps_available_at = time.monotonic() + Timing.create_delay
    # AWS reports gp3's baseline throughput when none was asked for (moto: none).
    if self.volume_type == "gp3" and self.throughput is None:
        self.throughput = 125


def _volume_status(self):
    if self.attachment:
        return "in-use"
    if time.monotonic() < getattr(self, "_cps_available_at", 0):
        return "creating"
    return "available"


Volume.__init__ = _volume_init
Volume.status = property(_volume_status)


# --- attachment state: "attaching" until the attach delay has passed -------------------------


def _attachment_status_get(self):
    if self._cps_status == "attaching" and time.monotonic() >= self._cps_ready_at:
        self._cps_status = "attached"
    return self._cps_status


def _attachment_status_set(self, value):
    self._cps_status = value
    self._cps_ready_at = time.monotonic() + (
        Timing.attach_delay if value == "attaching" else 0
    )


VolumeAttachment.status = property(_attachment_status_get, _attachment_status_set)

# --- AttachVolume: refuse what AWS refuses ---------------------------------------------------

_plain_attach_volume = EBSBackend.attach_volume


def _attach_volume(self, volume_id, instance_id, device_path, delete_on_termination=False):
    with LOCK:
        volume = self.get_volume(volume_id)
        instance = self.get_instance(instance_id)
        # The root volume moto creates inside RunInstances is attached before the instance runs.
        internal = getattr(_LAUNCHING, "active", False)
        if not internal:
            state = instance._state.name
            if state not in ("running", "stopped"):
                raise aws_error(
                    "IncorrectInstanceState",
                    f"The instance '{instance_id}' is not in the 'running' or 'stopped' states.",
                )
            if volume.attachment is not None:
                raise aws_error(
                    "VolumeInUse", f"{volume_id} is already attached to an instance"
                )
            if volume.status != "available":
                raise aws_error(
                    "IncorrectState",
                    f"vol '{volume_id}' is not 'available'. Current state: '{volume.status}'",
                )
            if volume.zone.name != instance.placement.zone:
                raise aws_error(
                    "InvalidVolume.ZoneMismatch",
                    f"The volume '{volume_id}' is not in the same availability zone as "
                    f"instance '{instance_id}'",
                )
            if device_path in instance.block_device_mapping:
                raise aws_error(
                    "InvalidParameterValue",
                    f"Invalid value '{device_path}' for unixDevice. "
                    f"Attachment point {device_path} is already in use",
                )
        attachment = _plain_attach_volume(
            self, volume_id, instance_id, device_path, delete_on_termination
        )
        attachment.status = "attaching" if not internal else "attached"
        return attachment


EBSBackend.attach_volume = _attach_volume

_LAUNCHING = threading.local()
_plain_setup_defaults = Instance.setup_defaults


def _setup_defaults(self):
    _LAUNCHING.active = True
    try:
        _plain_setup_defaults(self)
    finally:
        _LAUNCHING.active = False


Instance.setup_defaults = _setup_defaults

# --- Guests: instances played by real guests let go of their devices themselves -------------
# The bench registers an instance it plays as a guest (POST /cps/guests). A detach from it then
# stays `detaching`, and its termination `shutting-down` with its volumes attached, until the
# bench says the guest has let go or is off (POST /cps/guests/release) — on AWS a detach
# completes only once the instance's OS has released the device. No timer ends a hold: a guest
# that never lets go leaves the volume `detaching`, as on AWS. Unregistering an instance (its
# guest is gone) ends every hold it has.
GUESTS = set()
# ("volume", volume id) or ("instance", instance id) → (instance id, the step that completes it)
HELD = {}


def _set_guest(instance_id, guest):
    if guest:
        GUESTS.add(instance_id)
        return
    GUESTS.discard(instance_id)
    # Detaches before the termination: a termination detaches what is still attached.
    for key in sorted((k for k, v in HELD.items() if v[0] == instance_id), key=lambda k: k[0] != "volume"):
        HELD.pop(key)[1]()


def _release(doc):
    """Completes one held detach ({"volume_id"}) or termination ({"instance_id"}); False if
    none is held. (A termination released while the instance is still a guest detaches its
    volumes through the guest path, so they stay held: the bench ends a guest's termination by
    forgetting the guest instead.)"""
    key = ("volume", doc["volume_id"]) if "volume_id" in doc else ("instance", doc.get("instance_id"))
    held = HELD.pop(key, None)
    if held is None:
        return False
    held[1]()
    return True


_plain_detach_volume = EBSBackend.detach_volume


def _detach_volume(self, volume_id, instance_id, device_path):
    """AWS detaches over seconds (`detaching`, volume still in-use); termination too. A guest's
    detach waits for the guest (above)."""
    with LOCK:
        volume = self.get_volume(volume_id)
        attachment = volume.attachment
        instance = self.get_instance(instance_id)
        mapping = instance.block_device_mapping.get(device_path or getattr(attachment, "device", ""))
        root = mapping is not None and mapping.delete_on_termination
        guest = instance.id in GUESTS
        if (Timing.detach_delay <= 0 and not guest) or attachment is None or root:
            return _plain_detach_volume(self, volume_id, instance_id, device_path)
        if attachment.status == "detaching":
            return attachment
        attachment.status = "detaching"

        def finish():
            with LOCK:
                if volume.attachment is attachment:
                    _plain_detach_volume(self, volume_id, instance_id, device_path)

        # Held under the same lock as the check: the bench cannot forget the guest in between
        # (a hold nothing would end) nor see `detaching` with nothing held behind it.
        if guest:
            HELD[("volume", volume_id)] = (instance.id, finish)
            return attachment
    timer = threading.Timer(Timing.detach_delay, finish)
    timer.daemon = True
    timer.start()
    return attachment


EBSBackend.detach_volume = _detach_volume

# --- TerminateInstances: `shutting-down`, volumes still attached, for a while ----------------

_plain_terminate = Instance.terminate


def _terminate_now(self):
    # Secondary interfaces detach (and stay) when their instance is gone.
    for index, nic in list(self.nics.items()):
        if index != 0 and not nic.delete_on_termination:
            self.detach_eni(nic)
    return _plain_terminate(self)


def _terminate(self):
    """AWS shows a terminated instance `shutting-down` (volumes attached) before it is gone. A
    guest's stays so until the bench has powered the guest off (above)."""
    # Outside the lock, as before guests: moto's termination takes its own locks.
    if Timing.shutdown_delay <= 0 and self.id not in GUESTS:
        return _terminate_now(self)
    with LOCK:
        guest = self.id in GUESTS
        if getattr(self, "_cps_terminating", False) or self._state.name == "terminated":
            return copy.copy(self._state)
        previous = copy.copy(self._state)
        self._cps_terminating = True
        self._state.name = "shutting-down"
        self._state.code = 32

        def finish():
            with LOCK:
                if self._state.name != "terminated":
                    _terminate_now(self)

        # Held under the same lock as the check (as a detach is).
        if guest:
            HELD[("instance", self.id)] = (self.id, finish)
            return previous
    timer = threading.Timer(Timing.shutdown_delay, finish)
    timer.daemon = True
    timer.start()
    return previous


Instance.terminate = _terminate

# --- Auto Scaling: launch lifecycle hooks hold new instances in Pending:Wait -----------------

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
# States in which an instance waits on a lifecycle hook.
WAIT_STATES = ("Pending:Wait", "Terminating:Wait")
# Instance states waiting on a hook: (group backend, instance state) — scanned for timeouts.
_WAITING = []
_plain_instance_state_init = InstanceState.__init__


def _launch_hook(group):
    backend = group.autoscaling_backend
    for hook in backend.lifecycle_hooks.values():
        if hook.auto_scaling_group_name == group.name and hook.lifecycle_transition == LAUNCHING:
            return hook
    return None


def _hook_named(group, name):
    backend = group.autoscaling_backend
    for hook in backend.lifecycle_hooks.values():
        if hook.auto_scaling_group_name == group.name and hook.name == name:
            return hook
    return None


def _apply_override(state, group):
    """A mixed-instances group launches its first override (moto's stand-in for "prioritized");
    an override naming its own launch template launches from that template, and the instance
    reports that template and version, as AWS does."""
    policy = group.mixed_instances_policy or {}
    overrides = (policy.get("LaunchTemplate") or {}).get("Overrides") or []
    if not overrides:
        return
    first = overrides[0]
    if first.get("InstanceType"):
        state.instance_type = first["InstanceType"]
    spec = first.get("LaunchTemplateSpecification")
    if not spec:
        return
    ec2 = group.ec2_backend
    if spec.get("LaunchTemplateId"):
        template = ec2.get_launch_template(spec["LaunchTemplateId"])
    else:
        template = ec2.get_launch_template_by_name(spec["LaunchTemplateName"])
    version = template.get_version(spec.get("Version") or "$Default")
    state._cps_lt = (template.id, template.name)
    state._cps_lt_version = str(version.number)


def _instance_state_init(self, instance, lifecycle_state="InService", *args, **kwargs):
    _plain_instance_state_init(self, instance, lifecycle_state, *args, **kwargs)
    group = self.auto_scaling_group
    # AWS reports the launch template version the instance was launched from, not the
    # template's current default.
    self._cps_lt_version = None
    if group is not None and group.ec2_launch_template is not None:
        version = group.ec2_launch_template.get_version(group.launch_template_version)
        self._cps_lt_version = str(version.number)
        _apply_override(self, group)
    self._cps_joined_at = time.monotonic()
    hook = _launch_hook(group) if group is not None and lifecycle_state == "InService" else None
    if hook is not None:
        self._cps_hook = hook.name
        if Timing.pending_delay > 0:
            self.lifecycle_state = "Pending"
            timer = threading.Timer(Timing.pending_delay, _enter_wait, (group.autoscaling_backend, self, hook))
            timer.daemon = True
            timer.start()
        else:
            _enter_wait(group.autoscaling_backend, self, hook)


def _enter_wait(backend, state, hook):
    """The launch hook takes hold: `Pending:Wait` until completed or timed out."""
    with LOCK:
        if state.lifecycle_state not in ("InService", "Pending"):
            return
        state.lifecycle_state = "Pending:Wait"
        state._cps_deadline = time.monotonic() + float(hook.heartbeat_timeout)
        _WAITING.append((backend, state))


def _launch_template(self):
    if getattr(self, "_cps_lt", None) is not None:
        lt_id, lt_name = self._cps_lt
        return {"LaunchTemplateId": lt_id, "LaunchTemplateName": lt_name, "Version": self._cps_lt_version}
    if self.auto_scaling_group is None or self.auto_scaling_group.ec2_launch_template is None:
        return None
    lt = self.auto_scaling_group.ec2_launch_template
    return {
        "LaunchTemplateId": lt.id,
        "LaunchTemplateName": lt.name,
        "Version": getattr(self, "_cps_lt_version", None) or str(lt.default_version_number),
    }


InstanceState.__init__ = _instance_state_init
InstanceState.launch_template = property(_launch_template)

# Instances on their way in count towards the group's capacity, or moto launches more.
FakeAutoScalingGroup.active_instances = lambda self: [
    x for x in self.instance_states if x.lifecycle_state in ("InService", "Pending", "Pending:Wait", "Pending:Proceed")
]


def _find_waiting(backend, group_name, hook_name, instance_id):
    group = backend.autoscaling_groups.get(group_name)
    if group is None:
        raise AsgValidationError(f"AutoScalingGroup name not found - {group_name}")
    for state in group.instance_states:
        if (
            state.instance.id == instance_id
            and state.lifecycle_state in WAIT_STATES
            and getattr(state, "_cps_hook", None) == hook_name
        ):
            return group, state
    raise AsgValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")


def _finish(backend, group, state, result):
    """CONTINUE → InService; ABANDON → terminated, and the group launches a replacement.
    A terminating action ends in termination either way."""
    try:
        _WAITING.remove((backend, state))
    except ValueError:
        pass
    if state.lifecycle_state == "Terminating:Wait":
        state.lifecycle_state = "Terminating:Proceed"
        _plain_terminate_instance(backend, state.instance.id, False)
    elif result == "CONTINUE":
        state.lifecycle_state = "InService"
    else:
        state.lifecycle_state = "Terminating"
        backend.terminate_instance(state.instance.id, should_decrement=False)


def _waiting_for_request(response):
    """The group and instance state a lifecycle request names (call under LOCK)."""
    return _find_waiting(
        response.autoscaling_backend,
        response._get_param("AutoScalingGroupName"),
        response._get_param("LifecycleHookName"),
        response._get_param("InstanceId"),
    )


def _complete_lifecycle_action(self):
    result = (self._get_param("LifecycleActionResult") or "").upper()
    if result not in ("CONTINUE", "ABANDON"):
        raise AsgValidationError("LifecycleActionResult must be CONTINUE or ABANDON")
    with LOCK:
        group, state = _waiting_for_request(self)
        _finish(self.autoscaling_backend, group, state, result)
    return EmptyResult()


def _record_lifecycle_action_heartbeat(self):
    with LOCK:
        group, state = _waiting_for_request(self)
        hook = _hook_named(group, state._cps_hook)
        state._cps_deadline = time.monotonic() + float(hook.heartbeat_timeout)
    return EmptyResult()


AutoScalingResponse.complete_lifecycle_action = _complete_lifecycle_action

_plain_describe_asg_instances = AutoScalingBackend.describe_auto_scaling_instances


def _describe_auto_scaling_instances(self, instance_ids):
    """A new instance is not shown until the membership delay has passed since it joined."""
    now = time.monotonic()
    return [
        s
        for s in _plain_describe_asg_instances(self, instance_ids)
        if now - getattr(s, "_cps_joined_at", 0) >= Timing.membership_delay
    ]


AutoScalingBackend.describe_auto_scaling_instances = _describe_auto_scaling_instances
AutoScalingResponse.record_lifecycle_action_heartbeat = _record_lifecycle_action_heartbeat


def _expire_lifecycle_actions():
    """When a hook's heartbeat timeout passes, its default result applies."""
    while True:
        time.sleep(0.25)
        with LOCK:
            now = time.monotonic()
            for backend, state in list(_WAITING):
                if state.lifecycle_state not in WAIT_STATES:
                    _WAITING.remove((backend, state))
                elif now >= state._cps_deadline:
                    group = state.auto_scaling_group
                    hook = _hook_named(group, state._cps_hook)
                    _finish(backend, group, state, (hook.default_result if hook else "ABANDON").upper())


# --- Auto Scaling: TERMINATING hooks hold instances in Terminating:Wait ----------------------

_plain_terminate_instance = AutoScalingBackend.terminate_instance


def _terminate_instance(self, instance_id, should_decrement):
    """With a TERMINATING hook, AWS holds the instance in Terminating:Wait — still running, its
    volumes and interfaces attached — until the action is completed or times out, and launches
    the replacement meanwhile (unless Launch is suspended)."""
    with LOCK:
        state = next(
            (s for g in self.autoscaling_groups.values() for s in g.instance_states if s.instance.id == instance_id),
            None,
        )
        group = state.auto_scaling_group if state is not None else None
        hook = None
        if group is not None:
            hook = next(
                (
                    h
                    for h in self.lifecycle_hooks.values()
                    if h.auto_scaling_group_name == group.name and h.lifecycle_transition == TERMINATING
                ),
                None,
            )
        if hook is None:
            return _plain_terminate_instance(self, instance_id, should_decrement)
        original = group.desired_capacity
        if state.lifecycle_state not in ("Terminating:Wait", "Terminating:Proceed"):
            if should_decrement:
                group.desired_capacity -= 1
            state.lifecycle_state = "Terminating:Wait"
            state._cps_hook = hook.name
            state._cps_deadline = time.monotonic() + float(hook.heartbeat_timeout)
            _WAITING.append((self, state))
            group.set_desired_capacity(group.desired_capacity)
        return TerminateInstanceActivity(state.instance, original)


AutoScalingBackend.terminate_instance = _terminate_instance

# --- Auto Scaling: a suspended Launch process launches nothing until it is resumed -----------

_plain_replace_instances = FakeAutoScalingGroup.replace_autoscaling_group_instances


def _replace_instances(self, count_needed, propagated_tags):
    if "Launch" in (self._suspended_processes or []):
        return None
    return _plain_replace_instances(self, count_needed, propagated_tags)


FakeAutoScalingGroup.replace_autoscaling_group_instances = _replace_instances

_plain_resume_processes = AutoScalingBackend.resume_processes


def _resume_processes(self, group_name, scaling_processes):
    """Once Launch is resumed, the group launches what it is short of."""
    with LOCK:
        _plain_resume_processes(self, group_name, scaling_processes)
        group = self.autoscaling_groups[group_name]
        group.set_desired_capacity(group.desired_capacity)


AutoScalingBackend.resume_processes = _resume_processes

# --- Auto Scaling: instance refreshes (recorded with their status, not played) ---------------

# (account, region, group) → refreshes, newest first.
_REFRESHES = {}
ACTIVE_REFRESH = ("Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking")


def _refreshes(response, name):
    if name not in response.autoscaling_backend.autoscaling_groups:
        raise AsgValidationError(f"AutoScalingGroup name not found - {name}")
    return _REFRESHES.setdefault((response.current_account, response.region, name), [])


def _start_instance_refresh(self):
    name = self._get_param("AutoScalingGroupName")
    with LOCK:
        known = _refreshes(self, name)
        if any(r["Status"] in ACTIVE_REFRESH for r in known):
            raise AutoscalingClientError(
                "InstanceRefreshInProgress",
                "An Instance Refresh is already in progress and blocks the execution of this Instance Refresh.",
            )
        refresh_id = str(uuid.uuid4())
        known.insert(
            0,
            {
                "InstanceRefreshId": refresh_id,
                "AutoScalingGroupName": name,
                "Status": "InProgress",
                "StatusReason": "Waiting for instances to be replaced.",
                "StartTime": datetime.datetime.now(datetime.timezone.utc),
                "PercentageComplete": 0,
                "InstancesToUpdate": 0,
            },
        )
    return ActionResult({"InstanceRefreshId": refresh_id})


def _describe_instance_refreshes(self):
    name = self._get_param("AutoScalingGroupName")
    wanted = self._get_param("InstanceRefreshIds", [])
    with LOCK:
        found = [dict(r) for r in _refreshes(self, name) if not wanted or r["InstanceRefreshId"] in wanted]
    return ActionResult({"InstanceRefreshes": found})


def _cancel_instance_refresh(self):
    name = self._get_param("AutoScalingGroupName")
    with LOCK:
        active = [r for r in _refreshes(self, name) if r["Status"] in ACTIVE_REFRESH]
        if not active:
            raise AutoscalingClientError(
                "ActiveInstanceRefreshNotFound", "No in progress or pending Instance Refresh found for Auto Scaling group " + name
            )
        active[0]["Status"] = "Cancelled"
        active[0]["EndTime"] = datetime.datetime.now(datetime.timezone.utc)
    return ActionResult({"InstanceRefreshId": active[0]["InstanceRefreshId"]})


AutoScalingResponse.start_instance_refresh = _start_instance_refresh
AutoScalingResponse.describe_instance_refreshes = _describe_instance_refreshes
AutoScalingResponse.cancel_instance_refresh = _cancel_instance_refresh

# --- AttachNetworkInterface: refuse what AWS refuses; secondary interfaces detach on termination

_plain_attach_eni = NetworkInterfaceBackend.attach_network_interface


def _attach_network_interface(self, eni_id, instance_id, device_index):
    with LOCK:
        eni = self.get_network_interface(eni_id)
        instance = self.get_instance(instance_id)
        if instance._state.name not in ("running", "stopped"):
            raise aws_error(
                "IncorrectInstanceState",
                f"The instance '{instance_id}' is not in the 'running' or 'stopped' states.",
            )
        if eni.instance is not None:
            raise aws_error("InvalidNetworkInterface.InUse", f"Interface: [{eni_id}] in use.")
        if eni.subnet.availability_zone != instance.placement.zone:
            raise aws_error(
                "InvalidParameterCombination",
                "You may not attach a network interface to an instance if they are not in the same availability zone",
            )
        if int(device_index) in instance.nics:
            raise aws_error(
                "InvalidParameterValue",
                f"Instance '{instance_id}' already has an interface attached at device index '{device_index}'.",
            )
        return _plain_attach_eni(self, eni_id, instance_id, device_index)


NetworkInterfaceBackend.attach_network_interface = _attach_network_interface

# --- CreateVolume: ClientToken idempotency ---------------------------------------------------

_CLIENT_TOKENS = {}
_plain_create_volume_response = ElasticBlockStore.create_volume


def _create_volume_checked(self):
    with LOCK:
        _check_restore(self)
        return _plain_create_volume_response(self)


def _create_volume_response(self):
    token = self._get_param("ClientToken")
    if not token:
        return _create_volume_checked(self)
    # Everything but the token itself must match for the retry to be the same request.
    params = {k: v for k, v in self.querystring.items() if k not in ("ClientToken", "Action", "Version")}
    fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    with LOCK:
        known = _CLIENT_TOKENS.get((self.current_account, self.region, token))
        if known is not None:
            volume, known_fingerprint = known
            if known_fingerprint != fingerprint:
                raise aws_error(
                    "IdempotentParameterMismatch",
                    "The client token you have provided is associated with a resource that "
                    "has different parameters.",
                )
            # AWS answers a used token with the volume it made, for hours, even after that
            # volume was deleted (moto would make a new one): the reply names a volume that
            # DescribeVolumes no longer knows.
            return ActionResult(volume)
        result = _create_volume_checked(self)
        _CLIENT_TOKENS[(self.current_account, self.region, token)] = (result.result, fingerprint)
        return result


ElasticBlockStore.create_volume = _create_volume_response

# --- DescribeVolumes: MaxResults / NextToken pagination --------------------------------------

_plain_describe_volumes_response = ElasticBlockStore.describe_volumes


def _describe_volumes_response(self):
    max_results = self._get_param("MaxResults")
    next_token = self._get_param("NextToken")
    if max_results is None and next_token is None:
        return _plain_describe_volumes_response(self)
    if self._get_param("VolumeIds", []) or self._get_param("VolumeId", []):
        raise aws_error(
            "InvalidParameterCombination",
            "The parameter volumeSet cannot be used with the parameter maxResults",
        )
    max_results = int(max_results) if max_results is not None else 500
    if not 5 <= max_results <= 500:
        raise aws_error(
            "InvalidParameterValue",
            f"Value ( {max_results} ) for parameter maxResults is invalid. "
            "Expecting a value between 5 and 500.",
        )
    start = 0
    if next_token:
        try:
            start = int(base64.b64decode(next_token).decode())
        except (ValueError, UnicodeDecodeError):
            raise aws_error("InvalidParameterValue", "Invalid value for parameter nextToken")
    with LOCK:
        volumes = self.ec2_backend.describe_volumes(
            filters=self._filters_from_querystring()
        )
    volumes = sorted(volumes, key=lambda v: v.id)
    page = volumes[start : start + max_results]
    result = {"Volumes": page}
    if start + max_results < len(volumes):
        result["NextToken"] = base64.b64encode(str(start + max_results).encode()).decode()
    return ActionResult(result)


ElasticBlockStore.describe_volumes = _describe_volumes_response


# --- ModifyVolume / DescribeVolumesModifications: AWS's states and refusals -------------------
# moto completes every modification at once, allows any number of them (shrinking too) and lists
# each volume's whole history. AWS: the volume reports the target values at once; the
# modification is `modifying`, then `optimizing` (the device has grown), then `completed`; a
# second one is refused while one is under way (IncorrectModificationState) and within 6 hours of
# the last one's start (VolumeModificationRateExceeded), even when the first changed nothing;
# DescribeVolumesModifications reports the most recent modification of each volume.

MODIFICATION_COOLDOWN = 6 * 3600.0
# (account, region, volume id) → that volume's modifications, oldest first.
_MODIFICATIONS = {}
# Volume types whose size may go up to 16 TiB (AWS: io2 Block Express and sc1/st1 differ).
_MAX_SIZE = {"gp2": 16384, "gp3": 16384, "io1": 16384, "io2": 65536, "st1": 16384, "sc1": 16384, "standard": 1024}


def _modification_state(record, now):
    if record["failed"] is not None:
        return "failed", 0
    if now >= record["completed_at"]:
        return "completed", 100
    if now >= record["optimizing_at"]:
        span = record["completed_at"] - record["optimizing_at"]
        return "optimizing", int(100 * (now - record["optimizing_at"]) / span) if span > 0 else 0
    return "modifying", 0


def _modification_reply(record):
    state, progress = _modification_state(record, time.monotonic())
    reply = dict(record["reply"], ModificationState=state, Progress=progress)
    if state in ("completed", "failed"):
        done_at = record["completed_at"] if state == "completed" else record["failed_at"]
        reply["EndTime"] = record["reply"]["StartTime"] + datetime.timedelta(seconds=done_at - record["started_at"])
    if record["failed"] is not None:
        reply["StatusMessage"] = record["failed"]
    return reply


def _modification_targets(volume, size, volume_type, iops, throughput):
    """What the volume becomes: asked-for values, else what it has, else the new type's defaults."""
    target_type = volume_type or volume.volume_type
    same = target_type == volume.volume_type
    if target_type == "gp3":
        iops = iops or (volume.iops if same else None) or 3000
        throughput = throughput or (volume.throughput if same else None) or 125
    elif target_type in ("io1", "io2"):
        iops = iops or volume.iops
        if not iops:
            raise aws_error("InvalidParameterCombination", f"The parameter iops must be specified for {target_type} volumes.")
        if throughput:
            raise aws_error("InvalidParameterCombination", f"The parameter throughput is not supported for {target_type} volumes.")
    else:
        if iops or throughput:
            raise aws_error("InvalidParameterCombination", f"The parameters iops and throughput are not supported for {target_type} volumes.")
        iops = throughput = None
    return size or volume.size, target_type, iops, throughput


def _check_modification_allowed(records, volume_id, now):
    if not records:
        return
    last = records[-1]
    state, _ = _modification_state(last, now)
    if state in ("modifying", "optimizing"):
        raise aws_error(
            "IncorrectModificationState",
            f"Cannot modify volume {volume_id}: a modification of it is in the '{state}' state.",
        )
    if state != "failed" and now - last["started_at"] < MODIFICATION_COOLDOWN:
        raise aws_error(
            "VolumeModificationRateExceeded",
            "You've reached the maximum modification rate per volume limit. "
            "Wait at least 6 hours between modifications per EBS volume.",
        )


def _modify_volume_response(self):
    self.error_on_dryrun()
    volume_id = self._get_param("VolumeId")
    size = self._get_param("Size")
    size = int(size) if size is not None else None
    volume_type = self._get_param("VolumeType")
    iops = self._get_param("Iops")
    iops = int(iops) if iops is not None else None
    throughput = self._get_param("Throughput")
    throughput = int(throughput) if throughput is not None else None
    if size is None and volume_type is None and iops is None and throughput is None:
        raise aws_error("MissingParameter", "The request must contain at least one of the parameters: size, volumeType, iops, throughput.")
    with LOCK:
        volume = self.ec2_backend.get_volume(volume_id)
        if volume.status not in ("available", "in-use"):
            raise aws_error("IncorrectState", f"The volume '{volume_id}' is '{volume.status}'.")
        now = time.monotonic()
        records = _MODIFICATIONS.setdefault((self.current_account, self.region, volume_id), [])
        _check_modification_allowed(records, volume_id, now)
        if size is not None and size < volume.size:
            raise aws_error(
                "InvalidParameterValue",
                f"New size cannot be smaller than existing size (volume {volume_id} is {volume.size} GiB, asked for {size} GiB).",
            )
        size, target_type, iops, throughput = _modification_targets(volume, size, volume_type, iops, throughput)
        if size > _MAX_SIZE.get(target_type, 16384):
            raise aws_error("InvalidParameterValue", f"Volume of {size}GiB is too large for {target_type}; maximum is {_MAX_SIZE.get(target_type, 16384)}GiB.")
        reply = {
            "VolumeId": volume_id,
            "TargetSize": size,
            "TargetVolumeType": target_type,
            "TargetIops": iops,
            "TargetThroughput": throughput,
            "TargetMultiAttachEnabled": bool(volume.multi_attach_enabled),
            "OriginalSize": volume.size,
            "OriginalVolumeType": volume.volume_type,
            "OriginalIops": volume.iops,
            "OriginalThroughput": volume.throughput,
            "OriginalMultiAttachEnabled": bool(volume.multi_attach_enabled),
            "StartTime": datetime.datetime.now(datetime.timezone.utc),
        }
        reply = {k: v for k, v in reply.items() if v is not None}
        records.append(
            {
                "reply": reply,
                "volume": volume,
                "started_at": now,
                "optimizing_at": now + Timing.modifying_delay,
                "completed_at": now + Timing.modifying_delay + Timing.optimizing_delay,
                "failed": None,
                "failed_at": None,
            }
        )
        # DescribeVolumes reports the target at once, as AWS does.
        volume.size, volume.volume_type, volume.iops, volume.throughput = size, target_type, iops, throughput
        return ActionResult({"VolumeModification": _modification_reply(records[-1])})


_MODIFICATION_FILTERS = {
    "volume-id": lambda r: r["VolumeId"],
    "modification-state": lambda r: r["ModificationState"],
    "target-size": lambda r: str(r.get("TargetSize")),
    "target-volume-type": lambda r: r.get("TargetVolumeType"),
    "original-size": lambda r: str(r.get("OriginalSize")),
    "original-volume-type": lambda r: r.get("OriginalVolumeType"),
}


def _describe_volumes_modifications_response(self):
    volume_ids = self._get_param("VolumeIds", []) or []
    filters = self._filters_from_querystring() or {}
    for name in filters:
        if name not in _MODIFICATION_FILTERS:
            raise aws_error("InvalidParameterValue", f"The filter '{name}' is invalid")
    with LOCK:
        if volume_ids:
            self.ec2_backend.describe_volumes(volume_ids)  # InvalidVolume.NotFound for unknown ids
            wanted = list(volume_ids)
        else:
            wanted = [v.id for v in self.ec2_backend.describe_volumes()]
        found = []
        for volume_id in wanted:
            records = _MODIFICATIONS.get((self.current_account, self.region, volume_id)) or []
            if not records:
                if volume_ids:
                    raise aws_error(
                        "InvalidVolumeModification.NotFound",
                        f"Modification for volume '{volume_id}' does not exist.",
                    )
                continue
            found.append(_modification_reply(records[-1]))
    found = [r for r in found if all(_MODIFICATION_FILTERS[n](r) in _as_list(v) for n, v in filters.items())]
    return ActionResult({"VolumesModifications": found})


def _age_modifications(doc):
    """Moves modification start times `seconds` into the past (all, or one volume's), so that a
    test can try a second modification without waiting 6 hours. States are left as they are,
    unless `states` is true: then they move on as if the time had passed, so a test steps through
    them in order instead of racing a clock."""
    seconds = float(doc.get("seconds", 0))
    states = bool(doc.get("states"))
    volume_id = doc.get("volume_id")
    aged = 0
    for (_, _, vid), records in _MODIFICATIONS.items():
        if volume_id is not None and vid != volume_id:
            continue
        for r in records:
            r["started_at"] -= seconds
            r["reply"]["StartTime"] -= datetime.timedelta(seconds=seconds)
            if states:
                r["optimizing_at"] -= seconds
                r["completed_at"] -= seconds
            aged += 1
    return aged


def _fail_modification(doc):
    """The volume's modification under way fails (AWS: `failed`, the volume keeps its original
    size, type and performance)."""
    volume_id = doc["volume_id"]
    now = time.monotonic()
    for (_, _, vid), records in _MODIFICATIONS.items():
        if vid != volume_id or not records:
            continue
        last = records[-1]
        if _modification_state(last, now)[0] not in ("modifying", "optimizing"):
            return False
        last["failed"] = doc.get("message") or "The modification failed."
        last["failed_at"] = now
        volume, reply = last["volume"], last["reply"]
        volume.size = reply["OriginalSize"]
        volume.volume_type = reply["OriginalVolumeType"]
        volume.iops = reply.get("OriginalIops")
        volume.throughput = reply.get("OriginalThroughput")
        return True
    return False


ElasticBlockStore.modify_volume = _modify_volume_response
ElasticBlockStore.describe_volumes_modifications = _describe_volumes_modifications_response


# --- Snapshots: `pending` → `completed`, the size at the start, point-in-time data -----------
# moto completes a snapshot at once, reports its volume's size of *now* (a snapshot of a volume
# grown since grows too), lets CreateVolume use any snapshot at any size, ignores
# VolumeInitializationRate and OwnerIds, lists every snapshot in one page and answers an unknown
# id without a message. AWS: `pending` for a while (then `completed`, or `error`); the size is
# the volume's when the snapshot started; a volume is made only from a completed snapshot and at
# least as large as it; the rate is 100-300 MiB/s and only with a snapshot.

_plain_snapshot_init = Snapshot.__init__


def _snapshot_init(self, *args, **kwargs):
    _plain_snapshot_init(self, *args, **kwargs)
    self._cps_size = self.volume.size
    self._cps_started = time.monotonic()
    self._cps_completed_at = self._cps_started + Timing.snapshot_delay
    self._cps_failed = False


def _snapshot_state(self, now=None):
    now = time.monotonic() if now is None else now
    if getattr(self, "_cps_failed", False):
        return "error", 0
    completed_at = getattr(self, "_cps_completed_at", 0)
    if now >= completed_at:
        return "completed", 100
    span = completed_at - self._cps_started
    return "pending", int(100 * (now - self._cps_started) / span) if span > 0 else 0


Snapshot.__init__ = _snapshot_init
# moto's __init__ assigns "completed"; the state is computed instead.
Snapshot.status = property(lambda self: _snapshot_state(self)[0], lambda self, _value: None)
Snapshot.progress = property(lambda self: f"{_snapshot_state(self)[1]}%")
Snapshot.volume_size = property(lambda self: getattr(self, "_cps_size", None) or self.volume.size)


def _snapshot_not_found(snapshot_id):
    return aws_error("InvalidSnapshot.NotFound", f"The snapshot '{snapshot_id}' does not exist.")


def _copy_sparse(source, target):
    """Copies `source` to `target` block for block, holes left holes (SEEK_DATA/SEEK_HOLE), to a
    temporary name renamed into place: a reader never sees half a copy."""
    import os

    partial = f"{target}.partial"
    with open(source, "rb") as src, open(partial, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                done = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
                if done == 0:
                    break
                start += done
            offset = end
        dst.truncate(size)
    # No fsync: the readers are processes on this machine, which share the page cache.
    os.replace(partial, target)


def _image_of(volume):
    """The image holding `volume`'s data now: its own, else (never attached since it was restored)
    its snapshot's; None when it holds only zeros."""
    import os

    for name in (volume.id, volume.snapshot_id):
        if name and os.path.exists(os.path.join(Timing.image_dir, f"{name}.img")):
            return os.path.join(Timing.image_dir, f"{name}.img")
    return None


def _capture(snapshot):
    """The snapshot's data is the volume's at this moment (before CreateSnapshot replies)."""
    import os

    if Timing.image_dir is None:
        return
    source = _image_of(snapshot.volume)
    if source is not None:
        _copy_sparse(source, os.path.join(Timing.image_dir, f"{snapshot.id}.img"))


_plain_create_snapshot = EBSBackend.create_snapshot


def _create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):
    with LOCK:
        volume = self.get_volume(volume_id)
        if from_ami is None and volume.status not in ("available", "in-use"):
            raise aws_error("IncorrectState", f"The volume '{volume_id}' is '{volume.status}'.")
        snapshot = _plain_create_snapshot(self, volume_id, description, owner_id, from_ami)
        if from_ami is None:
            _capture(snapshot)
            # Pending for the whole delay after the copy, however long the copy took.
            snapshot._cps_completed_at = time.monotonic() + Timing.snapshot_delay
        return snapshot


EBSBackend.create_snapshot = _create_snapshot
_plain_get_snapshot = EBSBackend.get_snapshot


def _get_snapshot(self, snapshot_id):
    if snapshot_id not in self.snapshots:
        raise _snapshot_not_found(snapshot_id)
    return _plain_get_snapshot(self, snapshot_id)


EBSBackend.get_snapshot = _get_snapshot


def _describe_snapshots_response(self):
    """OwnerIds (self, an account id), unknown ids named, MaxResults/NextToken pages of 5-1000."""
    snapshot_ids = self._get_param("SnapshotIds", []) or []
    owners = self._get_param("OwnerIds", []) or []
    max_results = self._get_param("MaxResults")
    next_token = self._get_param("NextToken")
    if snapshot_ids and max_results is not None:
        raise aws_error("InvalidParameterCombination", "The parameter snapshotSet cannot be used with the parameter maxResults")
    with LOCK:
        for snapshot_id in snapshot_ids:
            if snapshot_id not in self.ec2_backend.snapshots:
                raise _snapshot_not_found(snapshot_id)
        found = self.ec2_backend.describe_snapshots(snapshot_ids=snapshot_ids, filters=self._filters_from_querystring())
    if owners:
        wanted = {self.current_account if o == "self" else o for o in owners}
        found = [s for s in found if s.owner_id in wanted]
    if max_results is None and not next_token:
        return ActionResult({"Snapshots": found})
    max_results = int(max_results) if max_results is not None else 1000
    if not 5 <= max_results <= 1000:
        raise aws_error("InvalidParameterValue", f"Value ( {max_results} ) for parameter maxResults is invalid. Expecting a value between 5 and 1000.")
    start = int(base64.b64decode(next_token).decode()) if next_token else 0
    found = sorted(found, key=lambda s: s.id)
    result = {"Snapshots": found[start : start + max_results]}
    if start + max_results < len(found):
        result["NextToken"] = base64.b64encode(str(start + max_results).encode()).decode()
    return ActionResult(result)


ElasticBlockStore.describe_snapshots = _describe_snapshots_response


def _fail_snapshot(doc):
    """A snapshot fails (`error`), as EBS may: POST /cps/snapshots/fail {"snapshot_id": ID}."""
    for backends in _ec2_backends().values():
        for backend in backends.values():
            snapshot = backend.snapshots.get(doc["snapshot_id"])
            if snapshot is not None:
                snapshot._cps_failed = True
                return True
    return False


def _ec2_backends():
    from moto.ec2.models import ec2_backends

    return {account: dict(regions.items()) for account, regions in ec2_backends.items()}


def _check_restore(response):
    """CreateVolume's snapshot rules (call under LOCK, before the volume is made)."""
    snapshot_id = response._get_param("SnapshotId")
    rate = response._get_param("VolumeInitializationRate")
    if rate is not None:
        if not snapshot_id:
            raise aws_error("InvalidParameterCombination", "The parameter VolumeInitializationRate can only be specified with SnapshotId.")
        if not 100 <= int(rate) <= 300:
            raise aws_error("InvalidParameterValue", f"Value ({rate}) for parameter volumeInitializationRate is invalid. Specify a value between 100 and 300 MiB/s.")
    if not snapshot_id:
        return
    snapshot = response.ec2_backend.get_snapshot(snapshot_id)
    state = snapshot.status
    if state != "completed":
        raise aws_error("IncorrectState", f"Snapshot '{snapshot_id}' is in {state} state.")
    size = response._get_param("Size")
    if size is not None and int(size) < snapshot.volume_size:
        raise aws_error("InvalidParameterValue", f"Volume of {int(size)}GiB is too small; minimum is {snapshot.volume_size}GiB.")


_plain_backend_create_volume = EBSBackend.create_volume


def _backend_create_volume(self, size, zone_name, snapshot_id=None, *args, **kwargs):
    if snapshot_id and size is None:
        size = self.get_snapshot(snapshot_id).volume_size  # moto: the source's size of now
    return _plain_backend_create_volume(self, size, zone_name, snapshot_id, *args, **kwargs)


EBSBackend.create_volume = _backend_create_volume

# --- DeleteTags and DeleteVolume as AWS plays them --------------------------------------------
# moto's DeleteTags succeeds for a volume that does not exist and, without tags, removes none;
# AWS: InvalidVolume.NotFound, and without tags every tag of the resource goes (except aws:).
# DeleteVolume: moto refuses an attached volume already (VolumeInUse, AWS's sentence); AWS
# also refuses one still `creating`.

_plain_delete_tags_response = TagResponse.delete_tags


def _delete_tags_response(self):
    resource_ids = self._get_param("Resources", []) or []
    with LOCK:
        for rid in resource_ids:
            if rid.startswith("vol-"):
                self.ec2_backend.get_volume(rid)
            elif rid.startswith("snap-"):
                self.ec2_backend.get_snapshot(rid)
        if not self._get_param("Tags", []):
            for rid in resource_ids:
                keys = [k for k in self.ec2_backend.tags.get(rid, {}) if not k.startswith("aws:")]
                self.ec2_backend.delete_tag_keys([rid], keys)
            return EmptyResult()
        return _plain_delete_tags_response(self)


TagResponse.delete_tags = _delete_tags_response
_plain_delete_volume_response = ElasticBlockStore.delete_volume


def _delete_volume_response(self):
    """The request only: moto deletes volumes of its own inside RunInstances."""
    volume_id = self._get_param("VolumeId")
    with LOCK:
        volume = self.ec2_backend.get_volume(volume_id)
        if volume.attachment is None and volume.status == "creating":
            raise aws_error("IncorrectState", f"The volume '{volume_id}' is 'creating'.")
        return _plain_delete_volume_response(self)


ElasticBlockStore.delete_volume = _delete_volume_response


# --- A node's IAM policy: what AWS would allow a request signed with the node's key -----------
# moto's own auth mode checks actions against resource "*" only and skips most conditions, so a
# least-privilege policy (resources by ARN, tag conditions) cannot be proven with it. This checks
# the requests cps-attach makes the way IAM evaluates them: every (action, resource) the request
# needs must be allowed by a statement whose Action, Resource and conditions (StringEquals, and
# ForAllValues:StringEquals for aws:TagKeys) match.

NODE_POLICY = {"key": None, "statements": [], "denied": []}
ACCOUNT = "123456789012"


def _request_key(response):
    auth = response.headers.get("Authorization") or ""
    marker = "Credential="
    if marker not in auth:
        return None
    return auth.split(marker, 1)[1].split("/", 1)[0]


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _matches(pattern, value):
    import fnmatch

    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _statement_allows(statement, action, resource, context):
    if statement.get("Effect") != "Allow":
        return False
    if not any(_matches(a, action) for a in _as_list(statement.get("Action", []))):
        return False
    if not any(_matches(r, resource) for r in _as_list(statement.get("Resource", []))):
        return False
    for operator, pairs in (statement.get("Condition") or {}).items():
        for key, wanted in pairs.items():
            if operator == "StringEquals":
                if context.get(key) not in _as_list(wanted):
                    return False
            elif operator == "ForAllValues:StringEquals":
                # Every value of a multi-valued key (aws:TagKeys) must be allowed; no values
                # at all pass, as in IAM.
                if not all(v in _as_list(wanted) for v in _as_list(context.get(key, []))):
                    return False
            elif operator == "Null":
                # "true": the key is absent from the request; "false": it is present (a
                # multi-valued key with no values counts as absent, as in IAM).
                present = context.get(key) not in (None, "", [])
                if present != (str(wanted).lower() == "false"):
                    return False
            else:
                return False  # not evaluated here: deny rather than guess
    return True


def _tag_context(prefixes, tags):
    return {f"{p}/{k}": v for p in prefixes for k, v in tags.items()}


def _needed(response, service, action):
    """The (action, resource ARN, condition context) checks one request needs."""
    region = response.region
    arn = f"arn:aws:{service}:{region}:{ACCOUNT}"
    full = f"{service}:{action}"
    if service == "ec2":
        tags = response.ec2_backend.tags

        def resource(kind, rid):
            return (f"{arn}:{kind}/{rid}", _tag_context(["aws:ResourceTag", "ec2:ResourceTag"], tags.get(rid, {})))

        def snapshot_resource(rid):
            return (f"arn:aws:ec2:{region}::snapshot/{rid}", _tag_context(["aws:ResourceTag", "ec2:ResourceTag"], tags.get(rid, {})))

        if action == "CreateVolume":
            requested = response._parse_tag_specification().get("volume", {})
            context = _tag_context(["aws:RequestTag"], requested)
            checks = [(full, f"{arn}:volume/*", context)]
            snapshot_id = response._get_param("SnapshotId")
            if snapshot_id:
                # The snapshot is a resource of the request too; snapshot ARNs name no account.
                checks.append((full, *snapshot_resource(snapshot_id)))
            if requested:
                checks.append(("ec2:CreateTags", f"{arn}:volume/*", dict(context, **{"ec2:CreateAction": "CreateVolume"})))
            return checks
        if action == "CreateSnapshot":
            requested = response._parse_tag_specification().get("snapshot", {})
            context = _tag_context(["aws:RequestTag"], requested)
            context["aws:TagKeys"] = sorted(requested)
            checks = [
                (full, *resource("volume", response._get_param("VolumeId"))),
                (full, f"arn:aws:ec2:{region}::snapshot/*", context),
            ]
            if requested:
                checks.append(("ec2:CreateTags", f"arn:aws:ec2:{region}::snapshot/*", dict(context, **{"ec2:CreateAction": "CreateSnapshot"})))
            return checks
        if action == "DeleteTags":
            keys = [v[0] for k, v in sorted(response.querystring.items()) if k.startswith("Tag.") and k.endswith(".Key")]
            checks = []
            for rid in [v[0] for k, v in sorted(response.querystring.items()) if k.startswith("ResourceId.")]:
                arn_, context = snapshot_resource(rid) if rid.startswith("snap-") else resource("volume" if rid.startswith("vol-") else "resource", rid)
                checks.append((full, arn_, dict(context, **{"aws:TagKeys": sorted(keys)})))
            return checks
        if action == "DeleteVolume":
            return [(full, *resource("volume", response._get_param("VolumeId")))]
        if action == "CreateTags":
            # Tags on existing resources (cps-attach's format journal on its volume).
            requested = {}
            for key, values in response.querystring.items():
                if key.startswith("Tag.") and key.endswith(".Key"):
                    value = response.querystring.get(key[: -len("Key")] + "Value", [""])[0]
                    requested[values[0]] = value
            kinds = {"vol": "volume", "i": "instance", "eni": "network-interface"}
            checks = []
            ids = [v[0] for k, v in sorted(response.querystring.items()) if k.startswith("ResourceId.")]
            for rid in ids:
                kind = kinds.get(rid.split("-", 1)[0], "resource")
                arn_, context = resource(kind, rid)
                context = dict(context, **_tag_context(["aws:RequestTag"], requested))
                context["aws:TagKeys"] = sorted(requested)
                checks.append((full, arn_, context))
            return checks
        if action == "AttachVolume":
            pairs = [resource("volume", response._get_param("VolumeId")), resource("instance", response._get_param("InstanceId"))]
            return [(full, r, c) for r, c in pairs]
        if action == "ModifyVolume":
            return [(full, *resource("volume", response._get_param("VolumeId")))]
        if action == "AttachNetworkInterface":
            pairs = [
                resource("network-interface", response._get_param("NetworkInterfaceId")),
                resource("instance", response._get_param("InstanceId")),
            ]
            return [(full, r, c) for r, c in pairs]
    if service == "ssm" and action == "GetParameter":
        name = response._get_param("Name") or ""
        resource = name if name.startswith("arn:") else f"{arn}:parameter/{name.lstrip('/')}"
        return [(full, resource, {})]
    if service == "secretsmanager" and action == "GetSecretValue":
        secret_id = response._get_param("SecretId") or ""
        secrets = response.backend.secrets
        # By name or ARN; the ARN of a secret that exists ends in its random suffix.
        resource = secrets[secret_id].arn if secret_id in secrets else f"{arn}:secret:{secret_id}"
        return [(full, resource, {})]
    if service == "dynamodb":
        # Item and table actions on the table by its ARN (the lock table cps relocations use).
        table = response._get_param("TableName") or ""
        resource = table if table.startswith("arn:") else f"{arn}:table/{table}"
        return [(full, resource, {})]
    if service == "autoscaling" and action in ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"):
        name = response._get_param("AutoScalingGroupName")
        group = response.autoscaling_backend.autoscaling_groups.get(name)
        tags = {t["Key"]: t["Value"] for t in (group.tags if group else [])}
        group_arn = f"{arn}:autoScalingGroup:*:autoScalingGroupName/{name}"
        return [(full, group_arn, _tag_context(["aws:ResourceTag", "autoscaling:ResourceTag"], tags))]
    return [(full, "*", {})]


class Ec2Unauthorized(HTTPException):
    """EC2's 403 UnauthorizedOperation, in EC2's error format."""

    code = 403

    def __init__(self, message):
        super().__init__()
        from xml.sax.saxutils import escape

        self.description = (
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
            "<Code>UnauthorizedOperation</Code>"
            f"<Message>You are not authorized to perform this operation. {escape(message)}</Message>"
            "</Error></Errors><RequestID>cps-emulator</RequestID></Response>"
        )


_plain_authorize = BaseResponse._authenticate_and_authorize_normal_action


def _authorize(self, resource="*"):
    _plain_authorize(self, resource)
    if NODE_POLICY["key"] is None or _request_key(self) != NODE_POLICY["key"]:
        return
    service = "ec2" if self.service_name == "ec2" else self.service_name
    action = self._get_action()
    for needed_action, arn, context in _needed(self, service, action):
        if not any(_statement_allows(s, needed_action, arn, context) for s in NODE_POLICY["statements"]):
            message = f"the node's policy does not allow {needed_action} on {arn}"
            with LOCK:
                NODE_POLICY["denied"].append(needed_action)
            if service == "ec2":
                raise Ec2Unauthorized(message)
            if service in ("ssm", "secretsmanager", "dynamodb"):
                # JSON protocols: AWS's AccessDeniedException in their error format.
                raise JsonRESTError(
                    "AccessDeniedException",
                    f"User: arn:aws:iam::{ACCOUNT}:user/node is not authorized to perform: {needed_action} on resource: {arn} ({message})",
                )
            raise AccessDeniedError(f"arn:aws:iam::{ACCOUNT}:user/node", f"{needed_action} ({message})")


BaseResponse._authenticate_and_authorize_normal_action = _authorize


# --- DynamoDB: conditional writes decided atomically; injected throttling ---------------------
# moto evaluates an UpdateItem's ConditionExpression and then applies the update without a lock,
# so two concurrent requests on the threaded server can both pass the same condition (measured:
# 4 racing takes of a fresh lock item, 150 rounds, 91 rounds with more than one winner, each
# answered token 1). DynamoDB decides a conditional write atomically per item; here every
# DynamoDB request runs under the emulator's lock, which is as strong and fine for a bench.
# POST /cps/faults {"service": "dynamodb", "action": A, "code": C, "times": N} makes the next N
# requests of A answer error C (HTTP 400) before they take effect: throttling
# (ProvisionedThroughputExceededException, ThrottlingException, RequestLimitExceeded) is
# otherwise unreachable on an on-demand table.

FAULTS = []

_THROTTLE_MESSAGES = {
    "ProvisionedThroughputExceededException": "The level of configured provisioned throughput for the table was exceeded. Consider increasing your provisioning level with the UpdateTable API.",
    "ThrottlingException": "Throughput exceeds the current capacity of your table or index.",
    "RequestLimitExceeded": "Throughput exceeds the current throughput limit for your account.",
}

_plain_dynamodb_call_action = DynamoHandler.call_action


def _next_fault(service, action):
    for fault in FAULTS:
        if fault["service"] == service and fault["action"] == action and fault["times"] > 0:
            fault["times"] -= 1
            return fault
    return None


def _build_backends():
    """Builds the backends of the services the bench uses, in its region, before serving.

    moto builds a backend on its first request, under its global `backend_lock`; building EC2's
    loads moto's AMIs, which makes their snapshots through the patched CreateSnapshot, under
    LOCK. A request handled under LOCK that needed a backend built (DynamoDB's first request:
    its backend, then KMS's) waited for `backend_lock` while EC2's builder waited for LOCK: the
    emulator stopped answering (seen: a bench stalled at CreateTable, the two threads' stacks
    exactly so). Built here, on one thread, nothing under LOCK builds a backend again.
    """
    from moto.backends import get_backend

    for service in ("ec2", "ebs", "autoscaling", "dynamodb", "kms", "ssm", "secretsmanager"):
        get_backend(service)[ACCOUNT]["us-east-1"]
    for service in ("iam", "sts"):
        get_backend(service)[ACCOUNT]["aws"]


def _dynamodb_call_action(self):
    with LOCK:
        fault = _next_fault("dynamodb", self._get_action())
        if fault is not None:
            code = fault["code"]
            body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": fault.get("message") or _THROTTLE_MESSAGES.get(code, "Injected failure.")})
            return 400, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": "cps-emulator-fault"}, body
        return _plain_dynamodb_call_action(self)


DynamoHandler.call_action = _dynamodb_call_action


def with_policy_api(app):
    """Adds the control paths to the emulator: POST /cps/node-policy (set it), GET
    /cps/node-policy (the actions it denied so far, in order), POST /cps/settings, POST
    /cps/modifications/age {"seconds": S, "volume_id": V?, "states": B?}, POST /cps/modifications/fail
    {"volume_id": V, "message": M?}, POST /cps/faults {"service", "action", "code", "times"},
    POST /cps/guests {"instance_id": I, "guest": B?} and POST /cps/guests/release
    {"volume_id": V} or {"instance_id": I}."""

    def wsgi(environ, start_response):
        if environ.get("PATH_INFO") == "/cps/node-policy" and environ.get("REQUEST_METHOD") == "GET":
            with LOCK:
                body = json.dumps({"denied": NODE_POLICY["denied"]}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("PATH_INFO") == "/cps/settings" and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                for key in ("pending_delay", "membership_delay", "modifying_delay", "optimizing_delay", "snapshot_delay"):
                    if key in doc:
                        setattr(Timing, key, float(doc[key]))
                if "image_dir" in doc:
                    Timing.image_dir = doc["image_dir"]
            start_response("204 No Content", [("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") in ("/cps/guests", "/cps/guests/release") and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                if environ["PATH_INFO"] == "/cps/guests":
                    _set_guest(doc["instance_id"], bool(doc.get("guest", True)))
                    done = True
                else:
                    done = _release(doc)
            # 404: nothing held there, so a bench that releases what it never saw held shows.
            start_response("204 No Content" if done else "404 Not Found", [("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") == "/cps/snapshots/fail" and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                done = _fail_snapshot(doc)
            start_response("204 No Content" if done else "404 Not Found", [("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") in ("/cps/modifications/age", "/cps/modifications/fail") and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                if environ["PATH_INFO"].endswith("/age"):
                    done = _age_modifications(doc) > 0
                else:
                    done = _fail_modification(doc)
            # 404: nothing to age or fail, so a test's setup mistake shows.
            status = "204 No Content" if done else "404 Not Found"
            start_response(status, [("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") == "/cps/faults" and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                FAULTS.append({"service": doc["service"], "action": doc["action"], "code": doc["code"], "times": int(doc.get("times", 1)), "message": doc.get("message")})
            start_response("204 No Content", [("Content-Length", "0")])
            return [b""]
        if environ.get("PATH_INFO") == "/cps/node-policy" and environ.get("REQUEST_METHOD") == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            doc = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with LOCK:
                NODE_POLICY["key"] = doc.get("access_key")
                NODE_POLICY["statements"] = _as_list(doc.get("policy", {}).get("Statement", []))
                NODE_POLICY["denied"] = []
            start_response("204 No Content", [("Content-Length", "0")])
            return [b""]
        return app(environ, start_response)

    return wsgi


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--attach-delay", type=float, default=0.0)
    parser.add_argument("--create-delay", type=float, default=0.0)
    parser.add_argument("--detach-delay", type=float, default=0.0)
    parser.add_argument("--shutdown-delay", type=float, default=0.0)
    args = parser.parse_args()
    Timing.attach_delay = args.attach_delay
    Timing.create_delay = args.create_delay
    Timing.detach_delay = args.detach_delay
    Timing.shutdown_delay = args.shutdown_delay

    _build_backends()
    app = with_policy_api(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler
    )

    def stop(_signum, _frame):
        # shutdown() waits for serve_forever to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=_expire_lifecycle_actions, daemon=True).start()
    print(f"cps-emulator listening on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
