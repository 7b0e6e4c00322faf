"""GPU time of a call as a decode step sees it: inside a CUDA graph (no Python or launch overhead), with its weights
cold in L2 (each timed call reads its own copy of the inputs, and the copies together are several times the L2)."""
from __future__ import annotations

from typing import Callable

import torch

COLD_BYTES = 256 << 20  # more than 4x the L2 of an H100/H200 (50-60 MB)


def copies_for(nbytes: int, most: int = 64) -> int:
    """How many copies of `nbytes` of inputs make the rotation cold in L2."""
    return max(2, min(most, -(-COLD_BYTES // max(nbytes, 1))))


def graph_time_us(calls: list[Callable[[], object]], replays: int = 5) -> float:
    """Median over `replays` of (one replay of a graph running every call once) / len(calls), in microseconds."""
    for c in calls:  # compile, tune and allocate outside the graph
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    times.sort()
    return times[len(times) // 2]
