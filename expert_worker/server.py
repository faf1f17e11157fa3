"""The expert worker's `Experts` service: decode, one call into the ExpertEngine (off the event loop), encode.
`Stream` is what stages use (one long-lived stream each, one request per MoE layer); `Compute` is the
same exchange as a unary call, for tools and tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from stagemesh.errors import Unavailable
from stagemesh.proto import expert_pb2 as pb
from stagemesh.proto import expert_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import maps_errors
from stagemesh.proto.tensor_codec import decode, encode

SERVICE = pb.DESCRIPTOR.services_by_name["Experts"].full_name


class ExpertsServicer(pb_grpc.ExpertsServicer):
    def __init__(self) -> None:
        self.engine = None  # set once the experts are loaded
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="experts")
        self.stopping = False
        self._streams: set[asyncio.Task] = set()  # the tasks serving open Stream calls

    @maps_errors
    async def Compute(self, request: pb.ExpertRequest, context) -> pb.ExpertReply:
        return await self._compute(request)

    @maps_errors
    async def Stream(self, request_iterator: AsyncIterable[pb.ExpertRequest], context) -> AsyncIterator[pb.ExpertReply]:
        task = asyncio.current_task()
        self._streams.add(task)
        try:
            async for request in request_iterator:
                yield await self._compute(request)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            raise Unavailable("the expert worker is stopping") from None
        finally:
            self._streams.discard(task)

    def end_streams(self) -> None:
        """Before the server stops: every open Stream ends with UNAVAILABLE at once. Stages hold their
        streams for as long as they run, so left to the server's stop each would wait out its grace and
        then be cancelled (grpc logs that as an unhandled CancelledError)."""
        self.stopping = True
        for task in self._streams:
            task.cancel()

    async def _compute(self, request: pb.ExpertRequest) -> pb.ExpertReply:
        engine = self.engine
        if engine is None:
            raise Unavailable("expert worker is still loading")
        hidden, ids, weights = decode(request.hidden), decode(request.expert_ids), decode(request.weights)
        engine.check(request.layer, hidden, ids, weights)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.executor, engine.compute, request.layer, hidden, ids, weights)
        return pb.ExpertReply(output=encode(out))
