"""/llorch/infer/2 as a sans-IO state machine: bytes in, frames out, bytes to send. No sockets here.

Both ends drive the same class: the gateway as CLIENT (``request_inference`` in gateway/market/node_client.py), the provider
as SERVER (``serve_inference`` in node/service.py). One stream carries one request at a time; once a request is
done, the client may send the next one on the same stream (token indexes start again at 0):

    AWAIT_REQUEST   --client: request-->            AWAIT_ADMISSION
    DONE            --client: request-->            AWAIT_ADMISSION
    DONE            --client: cancel | more-->      DONE          (crossed the final frame)
    AWAIT_ADMISSION --server: accepted-->           STREAMING
    AWAIT_ADMISSION --server: busy | error-->       DONE
    STREAMING       --server: tokens (index = n)--> STREAMING
    STREAMING       --client: more-->               STREAMING
    STREAMING       --server: final | error-->      DONE
    STREAMING       --client: cancel-->             CANCELLING
    CANCELLING      --server: tokens (index = n)--> CANCELLING   (generated before the cancel arrived)
    CANCELLING      --client: more-->               CANCELLING
    CANCELLING      --server: final | error-->      DONE

Flow control: the server may send a tokens frame only while fewer than TOKEN_FRAMES_AHEAD_MAX of the request's
tokens frames are beyond the client's last ``more.taken`` (``may_send_tokens``); ``more.taken`` never decreases and
never exceeds the tokens frames sent. The client checks the same bound on what arrives, so a provider that ignores
it is caught.

Anything else (a frame in the wrong state, from the wrong side, tokens out of order, an oversized or malformed
frame) raises ProtocolError and the stream must be reset.
"""

from __future__ import annotations

import enum

from llorch.node import limits
from llorch.node.errors import ProtocolError
from llorch.node.wire.frames import (FRAME_TYPES, Accepted, Busy, Cancel, Error, Final, Frame, FramedProtocol, More,
                                    Request, Tokens)

INFER_PROTOCOL_ID = "/llorch/infer/2"


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
    (State.DONE, Role.CLIENT, More): State.DONE,
    (State.AWAIT_ADMISSION, Role.SERVER, Accepted): State.STREAMING,
    (State.AWAIT_ADMISSION, Role.SERVER, Busy): State.DONE,
    (State.AWAIT_ADMISSION, Role.SERVER, Error): State.DONE,
    (State.STREAMING, Role.SERVER, Tokens): State.STREAMING,
    (State.STREAMING, Role.CLIENT, More): State.STREAMING,
    (State.STREAMING, Role.SERVER, Final): State.DONE,
    (State.STREAMING, Role.SERVER, Error): State.DONE,
    (State.STREAMING, Role.CLIENT, Cancel): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Tokens): State.CANCELLING,
    (State.CANCELLING, Role.CLIENT, More): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Final): State.DONE,
    (State.CANCELLING, Role.SERVER, Error): State.DONE,
}


class InferProtocol(FramedProtocol[Frame]):
    """One side of one /llorch/infer/2 stream. Per request: ``tokens_seen`` tokens in ``token_frames`` tokens
    frames, of which the client said it took ``taken``."""

    RECEIVE_BUFFER_BYTES_MAX = limits.RECEIVE_BUFFER_BYTES_MAX
    INCOMING = {"client": FRAME_TYPES, "server": FRAME_TYPES}

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        self.state: State = State.AWAIT_REQUEST
        self.tokens_seen = 0
        self.token_frames = 0
        self.taken = 0

    @property
    def may_send_tokens(self) -> bool:
        """Flow control: whether one more tokens frame may go now."""
        return self.token_frames - self.taken < limits.TOKEN_FRAMES_AHEAD_MAX

    @property
    def owes_more(self) -> bool:
        """The client's side: whether it has taken enough tokens frames since its last ``more`` to say so."""
        return self.token_frames - self.taken >= limits.TOKEN_FRAMES_PER_MORE

    def _frame_cap(self) -> int:
        return limits.REQUEST_FRAME_BYTES_MAX if self.state in (State.AWAIT_REQUEST, State.DONE) else \
            limits.FRAME_BYTES_MAX

    def _advance(self, sender: Role, frame: Frame) -> None:
        next_state = TRANSITIONS.get((self.state, sender, type(frame)))
        if next_state is None:
            raise ProtocolError(f"{frame.TYPE} frame from the {sender.value} is not allowed in state "
                                f"{self.state.value}")
        if isinstance(frame, Request):
            self.tokens_seen = self.token_frames = self.taken = 0
        elif isinstance(frame, Tokens):
            if frame.index != self.tokens_seen:
                raise ProtocolError(f"tokens frame with index {frame.index} arrived when {self.tokens_seen} was "
                                    f"expected")
            if not self.may_send_tokens:
                raise ProtocolError(f"tokens frame beyond flow control: {self.token_frames} sent, the gateway "
                                    f"took {self.taken}, at most {limits.TOKEN_FRAMES_AHEAD_MAX} may be ahead")
            self.tokens_seen += len(frame.texts)
            self.token_frames += 1
        elif isinstance(frame, More):
            if not self.taken <= frame.taken <= self.token_frames:
                raise ProtocolError(f"more.taken {frame.taken} is outside {self.taken}..{self.token_frames} (the "
                                    f"last one said and the tokens frames sent)")
            self.taken = frame.taken
        self.state = next_state
