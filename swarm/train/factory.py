"""Build the collaboration that ``averaging.mode`` asks for. It sits above both implementations, so
neither the interface (:mod:`swarm.train.collaboration`) nor either mode imports the other."""

from __future__ import annotations

from typing import Optional

import hivemind
import torch
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.progress import DownloadWatch
from swarm.config.schema import SwarmConfig
from swarm.net.admission import Admission
from swarm.train.collaboration import Collaboration
from swarm.train.diloco import DiLoCo
from swarm.train.rounds import record_bounds
from swarm.train.sync import build_collaborative_optimizer, inner_optimizer_factory


def build_collaboration(*, config: SwarmConfig, dht: hivemind.DHT, model: torch.nn.Module,
                        private_key: Optional[RSAPrivateKey] = None, role: str = "volunteer",
                        admission: Optional[Admission] = None, watch: Optional[DownloadWatch] = None) -> Collaboration:
    """The collaboration for ``config.averaging.mode`` around ``model``'s parameters; each mode gets
    only the sections it reads.

    :param private_key: the peer's identity key (:mod:`swarm.net.identity`), for records it signs.
    :param role: this peer's certified role (:func:`swarm.net.admission.own_role`).
    :param admission: who may take part and as what (a run joined by its fingerprint); None: anyone, all volunteers.
    :param watch: where state downloads show their progress while they run (the trainer logs it).
    """
    if config.averaging.mode == "diloco":
        return DiLoCo(model=model, dht=dht, run_id=config.run_id, role=role,
                      inner_optimizer=inner_optimizer_factory(config.optimizer), config=config.diloco,
                      averaging=config.averaging, batch_size=config.training.batch_size, private_key=private_key,
                      bounds=record_bounds(config), admission=admission, watch=watch,
                      listen_host=config.network.listen_host)
    return build_collaborative_optimizer(dht=dht, run_id=config.run_id, role=role, params=model.parameters(),
                                         optimizer=config.optimizer, training=config.training,
                                         averaging=config.averaging, sync=config.sync, private_key=private_key,
                                         admission=admission, watch=watch)
