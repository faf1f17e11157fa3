"""One long-lived `Experts.Stream` call from a stage to one expert worker, driven from the compute thread:
`send(request)` writes one MoE layer's request, the returned handle's `result()` blocks for its reply.

Replies come back in request order and are matched to their requests by position, so a reply left
unread (its layer failed at another worker first) never reaches the wrong reader. Calls have a timeout
without a deadline on the stream itself: a watchdog thread (one per ExpertPool) cancels a stream whose
oldest unanswered request is overdue, and its reader then sees a grpc.RpcError like a failed unary call.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable

import grpc
from stagemesh.proto import expert_pb2 as pb
from stagemesh.proto import expert_pb2_grpc as pb_grpc

WATCH_SECONDS = 0.5  # how often the watchdog looks for overdue streams
_END = object()  # put into the request queue: the stream's writing side is done


class StreamEnded(grpc.RpcError):
    """The worker closed the stream without an error status (it should not): read as UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the expert stream ended"


class ExpertStream:
    def __init__(self, stub: pb_grpc.ExpertsStub) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Stream(iter(self._requests.get, _END))  # the replies, as an iterator
        self._sent = self._received = 0
        self._claimed: dict[int, pb.ExpertReply | None] = {}  # request index -> its reply once read
        self.timeout = math.inf
        self.deadline = math.inf  # monotonic time by which the oldest unread reply is overdue
        self.broken = False

    def send(self, request: pb.ExpertRequest, timeout: float) -> PendingReply:
        if self._received == self._sent:
            self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        index, self._sent = self._sent, self._sent + 1
        self._claimed[index] = None
        self._requests.put(request)
        return PendingReply(self, index)

    def reply(self, index: int) -> pb.ExpertReply:
        """The reply to request `index`; earlier replies still wanted are kept for their readers, the
        rest (requests abandoned when their layer failed at another worker) are dropped."""
        while self._claimed.get(index) is None:
            reply, at = self._read(), self._received - 1
            if at in self._claimed:
                self._claimed[at] = reply
        return self._claimed.pop(index)

    def _read(self) -> pb.ExpertReply:
        try:
            reply = next(self._call)
        except grpc.RpcError:
            self.broken = True
            raise
        except StopIteration:
            self.broken = True
            raise StreamEnded() from None
        self._received += 1
        pending = self._received < self._sent
        self.deadline = time.monotonic() + self.timeout if pending else math.inf
        return reply

    def abandon(self, index: int) -> None:
        self._claimed.pop(index, None)

    def close(self) -> None:
        self.broken = True
        self._requests.put(_END)  # frees grpc's thread that waits on the request queue
        self._call.cancel()


class PendingReply:
    """What `ExpertStream.send` returns: `result()` is the reply (grpc.RpcError if the stream failed)."""

    def __init__(self, stream: ExpertStream, index: int) -> None:
        self.stream, self.index = stream, index

    def result(self) -> pb.ExpertReply:
        return self.stream.reply(self.index)

    def __del__(self) -> None:  # never read (its layer failed first): its reply need not be kept
        self.stream.abandon(self.index)


class StreamWatchdog:
    """Cancels the streams whose oldest request waited past its timeout (a hung, not dead, worker)."""

    def __init__(self, streams: Callable[[], list[ExpertStream]]) -> None:
        self.streams = streams
        self._thread = threading.Thread(target=self._watch, name="expert-streams-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            now = time.monotonic()
            for stream in self.streams():
                if not stream.broken and stream.deadline < now:
                    stream.close()
