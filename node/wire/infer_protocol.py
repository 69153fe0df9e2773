"""/llorch/infer/1 as a sans-IO state machine: bytes in, frames out, bytes to send. No sockets here.

Both ends drive the same class: the gateway as CLIENT (``request_inference`` in gateway/market/node_client.py), the provider
as SERVER (``serve_inference`` in node/service.py). One stream carries one request at a time; once a request is
done, the client may send the next one on the same stream (token indexes start again at 0):

    AWAIT_REQUEST   --client: request-->            AWAIT_ADMISSION
    DONE            --client: request-->            AWAIT_ADMISSION
    DONE            --client: cancel-->             DONE          (a cancel that crossed the final frame)
    AWAIT_ADMISSION --server: accepted-->           STREAMING
    AWAIT_ADMISSION --server: busy | error-->       DONE
    STREAMING       --server: token (index = n)-->  STREAMING
    STREAMING       --server: final | error-->      DONE
    STREAMING       --client: cancel-->             CANCELLING
    CANCELLING      --server: token (index = n)-->  CANCELLING   (already in flight when the cancel arrived)
    CANCELLING      --server: final | error-->      DONE

Anything else (a frame in the wrong state, from the wrong side, a token out of order, an oversized or malformed
frame) raises ProtocolError and the stream must be reset.
"""

from __future__ import annotations

import enum

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import (FRAME_TYPES, Accepted, Busy, Cancel, Error, Final, Frame, FramedProtocol, Request,
                                    Token)

INFER_PROTOCOL_ID = "/llorch/infer/1"


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    def other(self) -> "Role":
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


class State(enum.Enum):
    AWAIT_REQUEST = "await_request"
    AWAIT_ADMISSION = "await_admission"
    STREAMING = "streaming"
    CANCELLING = "cancelling"
    DONE = "done"


# (state, sender, frame type) -> next state. The transition table is the protocol.
TRANSITIONS: dict[tuple[State, Role, type], State] = {
    (State.AWAIT_REQUEST, Role.CLIENT, Request): State.AWAIT_ADMISSION,
    (State.DONE, Role.CLIENT, Request): State.AWAIT_ADMISSION,
    (State.DONE, Role.CLIENT, Cancel): State.DONE,
    (State.AWAIT_ADMISSION, Role.SERVER, Accepted): State.STREAMING,
    (State.AWAIT_ADMISSION, Role.SERVER, Busy): State.DONE,
    (State.AWAIT_ADMISSION, Role.SERVER, Error): State.DONE,
    (State.STREAMING, Role.SERVER, Token): State.STREAMING,
    (State.STREAMING, Role.SERVER, Final): State.DONE,
    (State.STREAMING, Role.SERVER, Error): State.DONE,
    (State.STREAMING, Role.CLIENT, Cancel): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Token): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Final): State.DONE,
    (State.CANCELLING, Role.SERVER, Error): State.DONE,
}


class InferProtocol(FramedProtocol[Frame]):
    """One side of one /llorch/infer/1 stream."""

    RECEIVE_BUFFER_BYTES_MAX = limits.RECEIVE_BUFFER_BYTES_MAX
    INCOMING = {"client": FRAME_TYPES, "server": FRAME_TYPES}

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        self.state: State = State.AWAIT_REQUEST
        self.tokens_seen = 0

    def _frame_cap(self) -> int:
        return limits.REQUEST_FRAME_BYTES_MAX if self.state in (State.AWAIT_REQUEST, State.DONE) else \
            limits.FRAME_BYTES_MAX

    def _advance(self, sender: Role, frame: Frame) -> None:
        next_state = TRANSITIONS.get((self.state, sender, type(frame)))
        if next_state is None:
            raise ProtocolError(f"{frame.TYPE} frame from the {sender.value} is not allowed in state "
                                f"{self.state.value}")
        if isinstance(frame, Request):
            self.tokens_seen = 0
        if isinstance(frame, Token):
            if frame.index != self.tokens_seen:
                raise ProtocolError(f"token frame {frame.index} arrived when {self.tokens_seen} was expected")
            self.tokens_seen += 1
        self.state = next_state
