"""CUDA graphs: one captured forward per (tier, batch bucket), replayed instead of launching op by op.

At r > 0 a ViT forward issues a few hundred small kernels (matching, gathers, scatters per block), so at
small batches a merging tier is launch-bound and can be slower than r=0 when run eagerly. A tier fixes
every block's token count and a bucket fixes the batch, so each pair has static shapes and can be
captured once at warm-up. A capture that fails leaves that pair eager (logged), never the service down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


class _Captured:
    def __init__(
        self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, outputs: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        self.graph, self.static_in, self.outputs = graph, static_in, outputs


class GraphCache:
    """Captured graphs keyed by (tier name, bucket). Capture and replay run on the device's launch thread,
    inside the engine's stream."""

    def __init__(self, forward: Forward, device: torch.device, warmup_iters: int = 3) -> None:
        self.forward = forward
        self.device = device
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple[str, int], _Captured] = {}

    def has(self, tier: str, bucket: int) -> bool:
        return (tier, bucket) in self._graphs

    def capture(self, tier: str, r: object, bucket: int, height: int, width: int) -> bool:
        """Capture the forward of ``bucket`` uint8 images at ``r``; False (and eager) if capture fails."""
        static_in = torch.zeros((bucket, height, width, 3), dtype=torch.uint8, device=self.device)
        try:
            with torch.inference_mode():
                for _ in range(self.warmup_iters):  # lazy init and autotuning stay out of the graph
                    self.forward(static_in, r)
                torch.cuda.current_stream(self.device).synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=torch.cuda.current_stream(self.device)):
                    outputs = self.forward(static_in, r)
        except Exception:  # e.g. an op that syncs with the host: this pair stays eager
            log.warning(
                "CUDA graph capture failed for tier %s at batch %d; it runs eagerly",
                tier,
                bucket,
                exc_info=True,
            )
            return False
        self._graphs[(tier, bucket)] = _Captured(graph, static_in, outputs)
        return True

    def replay(self, tier: str, bucket: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``images`` (``n <= bucket`` rows, on the device) into the static input and replay.

        The outputs are the graph's static tensors: read (or copy) them before the next replay of the
        same pair, which on one stream is guaranteed for work queued right after this call.
        """
        captured = self._graphs[(tier, bucket)]
        captured.static_in[: images.shape[0]].copy_(images)
        captured.graph.replay()
        return captured.outputs

    @property
    def count(self) -> int:
        return len(self._graphs)
