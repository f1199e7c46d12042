"""``diloco.overlap``: a round's all-reduce runs in the background while the next round's inner steps go on.

The one-step-delayed ("eager") outer update. When a round closes, its pseudo-gradient (the round's
start parameters minus the local ones) is taken and averaged in a background thread, and the peer
keeps training from where it is. When the average arrives (at the next step that finds it ready, or
at the next round's close at the latest), the outer step is applied to the round's start parameters,
the outer state, and the local progress made since the close is laid on top:

    local = outer_after + (local_now - local_at_close)

The outer state (parameters, momentum, round, samples) is what peers compare, serve and hash
(:mod:`swarm.train.agreement`), and every member of a group applies the same average to the same
outer state, so it stays identical across members; the drift since the close is each peer's own, as
the inner steps of a round always were. The next round's pseudo-gradient is measured from the new
outer parameters, so it holds every inner step taken since the close, those before the average
came included. The inner optimizer (AdamW) keeps its moments across the jump, as it does across an
outer step without overlap.

While a round is in flight the peer's published state is the one from before it (its outer state has
not moved), and the peer does not adopt others' states: the average in flight brings it to its
partners' state, and a peer left behind (a failed round) catches up once it lands.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

from swarm.averaging.averager import Averaged


class InFlight:
    """One round's averaging, run in a daemon thread (a peer that leaves mid-round does not wait for it).

    :param round_number: the round being averaged.
    :param snapshot: the local parameters when it closed (CPU, float32): the drift is measured from them.
    :param average: the blocking call that averages the round's pseudo-gradient.
    """

    def __init__(self, *, round_number: int, snapshot: list[torch.Tensor], average: Callable[[], Averaged]):
        self.round_number, self.snapshot = round_number, snapshot
        self._result: Optional[Averaged] = None
        self._error: Optional[BaseException] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(average,), name=f"diloco-round-{round_number}",
                                        daemon=True)
        self._thread.start()

    def _run(self, average: Callable[[], Averaged]) -> None:
        try:
            self._result = average()
        except BaseException as e:  # raised in the trainer's thread by result(), as it would be without overlap
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Whether the average is ready (or failed) within ``timeout`` seconds (None: wait for it)."""
        return self._done.wait(timeout)

    def result(self) -> Averaged:
        """The average (waits for it); raises what the averaging raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end (a peer leaving); whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local parameters as the drift is measured from them (CPU, float32 copies)."""
    return [param.detach().to("cpu", torch.float32).clone() for param in params]


@torch.no_grad()
def carry_drift(params: list[torch.Tensor], outer_params: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """``params = outer_params + (params - before)``, in float32 (no drift: exactly the outer parameters)."""
    for local, outer, start in zip(params, outer_params, before):
        drift = local.detach().to("cpu", torch.float32) - start
        local.copy_((outer + drift).to(local.device, local.dtype))
