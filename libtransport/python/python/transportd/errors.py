"""The exceptions of transportd: one hierarchy under :class:`TransportError`.

Each carries a stable ``code`` (a lower-case label: a server's answer keeps its wire error
code's label, such as ``"not_found"`` or ``"audit_unavailable"``, and ``wire_code`` its
number; failures on this side have codes such as ``"unreachable"``, ``"unknown_ca"`` or
``"corrupt"``) and ``retriable``: whether the same call may succeed later. Messages name
no object and carry no payload.

===================  =================================================================
class                raised when
===================  =================================================================
Unauthenticated      the node refused our SVID (expired, revoked, another CA...)
ServerNotTrusted     we refused the node's SVID (an Unauthenticated)
PermissionDenied     a sidecar: this process (uid, executable) matches no registration
                     entry, so it has no identity there (an Unauthenticated)
IdentityError        our own identity could not be loaded (files, Workload API)
NotFound             no such dataset or object, *or* this identity may not access it
Busy                 the node cannot take the work now (limits, audit trail); retriable
Corrupt              a chunk failed BLAKE3 verification (nothing unverified is returned)
TooLarge             the object is over the caller's limit or the buffer's size
OutOfRange           a byte range outside the object
Changed              the object changed during the pull; pull it again
Conflict             another transfer is writing the object
NoSpace              the receiving disk, or its quota for pushes in progress, is full
Unreachable          the node could not be reached (retriable)
ConnectionLost       the connection failed mid-way (retriable)
SidecarUnavailable   a sidecar's socket is missing, refuses, or closed mid-call: the
                     sidecar is not running or was restarted (a ConnectionLost; retriable)
ProtocolError        the node broke the protocol, or speaks another version
LocalError           something failed on this side (a file, the runtime)
InvalidName          a dataset name or object path that is not valid (a ValueError)
===================  =================================================================

Through a sidecar (:meth:`transportd.Client.sidecar`), the storage node's codes the sidecar
passes on raise the classes above (``busy`` and the sidecar's own ``unavailable``:
:class:`Busy`; ``unreachable``: :class:`Unreachable`); a memory file handed over without its
seals, or an answer that is not the protocol's, is a :class:`ProtocolError`.
"""

from __future__ import annotations

__all__ = [
    "Busy",
    "Changed",
    "Conflict",
    "ConnectionLost",
    "Corrupt",
    "IdentityError",
    "InvalidName",
    "LocalError",
    "NoSpace",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "ServerNotTrusted",
    "SidecarUnavailable",
    "TooLarge",
    "TransportError",
    "Unauthenticated",
    "Unreachable",
]


class TransportError(Exception):
    """Base of every transportd error."""

    code: str = "transport"
    """A stable lower-case label for what failed."""
    retriable: bool = False
    """Whether the same call may succeed later."""
    wire_code: int | None = None
    """The node's error code (its number on the wire), when the node answered with one."""

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        wire_code: int | None = None,
        retriable: bool | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.wire_code = wire_code
        if retriable is not None:
            self.retriable = retriable


class Unauthenticated(TransportError):
    """The node refused our SVID; ``code`` says why (``unknown_ca``, ``revoked``...)."""

    code = "unauthenticated"


class ServerNotTrusted(Unauthenticated):
    """We refused the node's SVID (not of our trust bundle, or not the expected ID)."""

    code = "server_not_trusted"


class PermissionDenied(Unauthenticated):
    """A sidecar has no registration entry this process (its uid, gid and executable)
    matches, so it has no identity there: ask the node's operator for a registration entry
    for this uid and executable."""

    code = "permission_denied"


class IdentityError(TransportError):
    """Our identity could not be loaded: SVID files, or the SPIFFE Workload API."""

    code = "identity"


class NotFound(TransportError):
    """No such dataset or object, or this identity may not access it: the same answer."""

    code = "not_found"


class Busy(TransportError):
    """The node cannot take the work now; retry later."""

    code = "busy"
    retriable = True


class Corrupt(TransportError):
    """A chunk failed verification; nothing unverified was returned."""

    code = "corrupt"


class TooLarge(TransportError):
    """The object is larger than allowed (``max_bytes``, or the buffer's size)."""

    code = "too_large"


class OutOfRange(TransportError):
    """The byte range lies outside the object."""

    code = "range"


class Changed(TransportError):
    """The object changed while it was pulled: pull it again."""

    code = "changed"


class Conflict(TransportError):
    """Another transfer is writing this object."""

    code = "conflict"


class NoSpace(TransportError):
    """The receiving disk, or its quota for partial files of pushes in progress, is full.

    Push again once space is freed: chunks the node already stored are kept.
    """

    code = "no_space"


class Unreachable(TransportError):
    """The node could not be reached (for QUIC, also what a UDP firewall looks like)."""

    code = "unreachable"
    retriable = True


class ConnectionLost(TransportError):
    """The connection failed during the call."""

    code = "connection_lost"
    retriable = True


class SidecarUnavailable(ConnectionLost):
    """A sidecar's socket is missing, refuses connections, or closed during the call: the
    sidecar is not running or was restarted. Retry (a new connection is made)."""

    code = "unavailable"
    retriable = True


class ProtocolError(TransportError):
    """The node broke the protocol, or speaks no version we know."""

    code = "protocol"


class LocalError(TransportError):
    """Something failed on this side: a file, the runtime, a client used after fork."""

    code = "local"


class InvalidName(TransportError, ValueError):
    """A dataset name or object path that is not valid."""

    code = "invalid_name"
