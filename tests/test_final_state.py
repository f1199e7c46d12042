"""The end of a sync run: two real hivemind.Optimizers on real DHTs that finished with different
models settle on one (:mod:`swarm.train.agreement`), serving and downloading through the averaging
service, and a state that does not fit is refused without touching the peer's own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hivemind
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from conftest import DEBUG_CONFIG
from harness.processes import wait_for
from swarm.config.loading import load_config
from swarm.train.model import ByteGPT
from swarm.train.sync import TrainingState, build_collaborative_optimizer

RUN_ID = "final-state-test"


@pytest.fixture
def two_peers():
    config = load_config(DEBUG_CONFIG, environ={})
    dhts, peers = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])], []
    try:
        dhts.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                 initial_peers=dhts[0].get_visible_maddrs()))
        for dht in dhts:  # each with its own key for its progress records, as separate peers are
            torch.manual_seed(0)  # the same initial model on both, as in a real run
            model = ByteGPT(config.model)
            peers.append((dht, model, build_collaborative_optimizer(
                dht=dht, run_id=RUN_ID, role="volunteer", params=model.parameters(), optimizer=config.optimizer,
                training=config.training, averaging=config.averaging, sync=config.sync,
                private_key=RSAPrivateKey())))
        yield peers
    finally:
        for _, _, sync in peers:
            sync.shutdown()
        for dht in dhts:
            dht.shutdown()


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.timeout(120)
def test_peers_that_finished_apart_settle_on_one_model_and_optimizer_state(two_peers):
    (_, model_a, sync_a), (_, model_b, sync_b) = two_peers
    for seed, model, sync in ((1, model_a, sync_a), (2, model_b, sync_b)):  # a local step each: two models
        batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        averager = sync.opt.state_averager  # the optimizer is offloaded: it steps its own copy of the parameters
        averager._load_local_grads_into_optimizer_()
        averager.optimizer.step()
        with torch.no_grad():
            averager._apply_optimizer_parameters_()
        sync.zero_grad()
    states = [TrainingState(sync.opt.state_averager) for sync in (sync_a, sync_b)]
    assert states[0].digest(states[0].capture()) != states[1].digest(states[1].capture())

    ids = {dht.peer_id.to_base58() for dht, _, _ in two_peers}
    for sync in (sync_a, sync_b):  # in a run every peer reports progress at each step; these took none
        sync.opt.tracker.report_local_progress(sync.local_epoch, 1)
    wait_for(lambda: all(set(sync.epochs_of_peers()) == ids for sync in (sync_a, sync_b)), timeout=30,
             what="both peers to see each other's progress records")

    stop, deadline = threading.Event(), time.monotonic() + 60
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda sync: sync.finish(stop, deadline), (sync_a, sync_b)))
    assert results == [True, True]
    assert sync_a.counters().state_downloads + sync_b.counters().state_downloads == 1
    assert states[0].digest(states[0].capture()) == states[1].digest(states[1].capture())
    a, b = model_state(model_a), model_state(model_b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert torch.equal(sync_a.opt.state_averager.optimizer.state_dict()["state"][0]["exp_avg"],
                       sync_b.opt.state_averager.optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.timeout(120)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(two_peers):
    (_, model, sync), _ = two_peers
    state = TrainingState(sync.opt.state_averager)
    header, tensors = state.capture()
    before = model_state(model)
    wrong = [torch.zeros(3)] + [tensor + 1 for tensor in tensors[1:]]
    with pytest.raises(ValueError, match="does not match"):
        state.adopt((header, wrong))
    with pytest.raises(ValueError, match="does not match"):
        state.adopt((header, tensors[:-1]))
    after = model_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
