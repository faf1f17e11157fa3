"""A TP rank's place in its stage's group over time, as the coordinator arranges it: the first formation,
and every re-formation in place under a new group epoch (after a rank of the stage was replaced, or a
collective failed). The survivors keep their weights; a spare that took a lost role meets them there.

    JoinGroup(failed_epoch) -> (epoch, rendezvous)   returns once every rank of the stage asks for epoch
    rank 0: SetRendezvous(epoch, its store)          the other ranks' JoinGroup then returns that address
    TPGroup.form(epoch, rendezvous)                  on the compute thread; a failure here starts over
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from stagemesh.coordinator.client import Membership
from stagemesh.errors import CollectiveError, FailedPrecondition
from stagemesh.proto import coordinator_pb2 as cpb
from stagemesh.stage_worker.tp_group import TPGroup

log = logging.getLogger("stagemesh.stage")


class GroupFormation:
    def __init__(self, membership: Membership, group: TPGroup, host: str, advertise: str, store_port: int) -> None:
        self.membership, self.group = membership, group  # membership.worker_id changes if the coordinator restarts
        self.host, self.advertise, self.store_port = host, advertise, store_port

    async def form(self, executor: Executor, failed_epoch: int = -1) -> None:
        """Meets the stage's other ranks at the coordinator's next group epoch and forms the group there;
        waits as long as the stage has a lost role and no spare has taken it."""
        loop = asyncio.get_running_loop()
        while True:
            assignment = await self.membership.join_group(failed_epoch)
            epoch = assignment.group_epoch
            try:
                if self.group.rank == 0:
                    port = await loop.run_in_executor(executor, self.group.host_store, self.host, self.store_port)
                    address = f"{self.advertise}:{port}"
                    request = cpb.RendezvousRequest(
                        worker_id=self.membership.worker_id, address=address, group_epoch=epoch
                    )
                    await self.membership.client.call("SetRendezvous", request)
                await loop.run_in_executor(executor, self.group.form, epoch, assignment.rendezvous)
                log.info(
                    "tensor-parallel group formed at epoch %d (rank %d of %d)", epoch, self.group.rank, self.group.size
                )
                return
            except FailedPrecondition as e:  # the stage moved to a newer epoch meanwhile
                log.warning("group epoch %d: %s; joining the next one", epoch, e)
            except CollectiveError as e:  # a rank did not arrive (it died too): the next epoch
                log.warning("forming the group at epoch %d failed (%s); trying again", epoch, e)
                failed_epoch = epoch
