"""The AWS emulator for the cps bench: moto 5.2.5 plus the AWS behaviour moto lacks.

moto accepts operations that AWS refuses, and the agent's safety depends on those refusals
(AttachVolume is the only lock between agents racing for one volume). This module patches moto in
this process, then serves it on 127.0.0.1. Every patch says which AWS behaviour it restores.

Usage: python cps_emulator.py [--port N] [--attach-delay S] [--create-delay S] [--detach-delay S] [--shutdown-delay S]
Prints one line `cps-emulator listening on 127.0.0.1:PORT` once it accepts requests.
"""

import argparse
import base64
import copy
import hashlib
import json
import signal
import sys
import threading
import time

import moto

PINNED_MOTO = "5.2.5"
if moto.__version__ != PINNED_MOTO:
    sys.exit(
        f"cps_emulator: moto {moto.__version__} found, the patch layer is written for "
        f"{PINNED_MOTO}; run ci/setup to rebuild the venv"
    )

from moto.core.responses import ActionResult  # noqa: E402
from moto.ec2.exceptions import EC2ClientError  # noqa: E402
from moto.ec2.models.elastic_block_store import (  # noqa: E402
    EBSBackend,
    Volume,
    VolumeAttachment,
)
from moto.ec2.models.instances import Instance  # noqa: E402
from moto.ec2.responses.elastic_block_store import ElasticBlockStore  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
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


def aws_error(code, message):
    return EC2ClientError(code, message)


# --- volume state: "creating" until the create delay has passed ------------------------------

_plain_volume_init = Volume.__init__


def _volume_init(self, *args, **kwargs):
    _plain_volume_init(self, *args, **kwargs)
    self._cps_available_at = time.monotonic() + Timing.create_delay


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

_plain_detach_volume = EBSBackend.detach_volume


def _detach_volume(self, volume_id, instance_id, device_path):
    """AWS detaches over seconds (`detaching`, volume still in-use); termination too."""
    with LOCK:
        volume = self.get_volume(volume_id)
        attachment = volume.attachment
        instance = self.get_instance(instance_id)
        mapping = instance.block_device_mapping.get(device_path or getattr(attachment, "device", ""))
        root = mapping is not None and mapping.delete_on_termination
        if Timing.detach_delay <= 0 or attachment is None or root:
            return _plain_detach_volume(self, volume_id, instance_id, device_path)
        attachment.status = "detaching"

    def finish():
        with LOCK:
            if volume.attachment is attachment:
                _plain_detach_volume(self, volume_id, instance_id, device_path)

    timer = threading.Timer(Timing.detach_delay, finish)
    timer.daemon = True
    timer.start()
    return attachment


EBSBackend.detach_volume = _detach_volume

# --- TerminateInstances: `shutting-down`, volumes still attached, for a while ----------------

_plain_terminate = Instance.terminate


def _terminate(self):
    """AWS shows a terminated instance `shutting-down` (volumes attached) before it is gone."""
    if Timing.shutdown_delay <= 0:
        return _plain_terminate(self)
    with LOCK:
        if getattr(self, "_cps_terminating", False) or self._state.name == "terminated":
            return copy.copy(self._state)
        previous = copy.copy(self._state)
        self._cps_terminating = True
        self._state.name = "shutting-down"
        self._state.code = 32

    def finish():
        with LOCK:
            _plain_terminate(self)

    timer = threading.Timer(Timing.shutdown_delay, finish)
    timer.daemon = True
    timer.start()
    return previous


Instance.terminate = _terminate

# --- CreateVolume: ClientToken idempotency ---------------------------------------------------

_CLIENT_TOKENS = {}
_plain_create_volume_response = ElasticBlockStore.create_volume


def _create_volume_response(self):
    token = self._get_param("ClientToken")
    if not token:
        return _plain_create_volume_response(self)
    # Everything but the token itself must match for the retry to be the same request.
    params = {k: v for k, v in self.querystring.items() if k not in ("ClientToken", "Action", "Version")}
    fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    with LOCK:
        known = _CLIENT_TOKENS.get((self.current_account, self.region, token))
        if known is not None:
            volume_id, known_fingerprint = known
            if known_fingerprint != fingerprint:
                raise aws_error(
                    "IdempotentParameterMismatch",
                    "The client token you have provided is associated with a resource that "
                    "has different parameters.",
                )
            volume = self.ec2_backend.volumes.get(volume_id)
            if volume is not None:
                return ActionResult(volume)
        result = _plain_create_volume_response(self)
        _CLIENT_TOKENS[(self.current_account, self.region, token)] = (
            result.result.id,
            fingerprint,
        )
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

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        "127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler
    )

    def stop(_signum, _frame):
        # shutdown() waits for serve_forever to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"cps-emulator listening on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
