"""The UNet's sampling calls on a CUDA GPU replayed as CUDA graphs.

A guided SD v1 step at batch 2 launches about a thousand small kernels; on a fast GPU the Python
that launches them takes longer than the GPU takes to run them. A CUDA graph records the launches of one call once and replays them with one
launch from then on.

A graph is recorded for one set of input shapes, dtypes and weights, and reads its inputs from, and
writes its output to, fixed buffers. ``GraphedForward`` takes the module's place as its ``forward``
(the module, its parameters and their names stay as they are): a call whose shapes were seen before
copies its inputs into that graph's buffers, replays it and returns a copy of its output; the first
call of a shape runs as usual, the second runs once more on a side stream (where cuBLAS and cuDNN
settle their kernels and workspaces) and records the graph, and later calls replay it. Shapes seen
once, such as the odd tile at a canvas edge, never cost a recording. Calls with gradients, calls
during another recording and calls on other devices run as usual. Graphs are recorded again when
the weights change (a new tensor for any parameter or buffer), and at most ``MAX_GRAPHS`` are kept,
all in one memory pool, so their activations take about the memory of one call.
``python -m ldm bench --device cuda [--no-cuda-graphs]`` measures what they save.
"""

from __future__ import annotations

import collections
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_GRAPHS = 8
# shapes remembered for the "seen before" rule; a forgotten one just runs as usual once more
MAX_SEEN = 64


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the buffers the graph reads, by argument name
    output: torch.Tensor  # the buffer it writes


class GraphedForward:
    """A module's ``forward`` that replays CUDA graphs for calls without gradients (see the module
    docstring); ``eager`` runs the module's own. It holds the module weakly, so that a model dropped
    by its last user frees its memory (graphs included) at once, not at the next garbage collection."""

    def __init__(self, module: nn.Module, max_graphs: int = MAX_GRAPHS):
        self._module = weakref.ref(module)
        self._forward = type(module).forward  # the class's, which this instance attribute hides
        self.signature = inspect.signature(self._forward.__get__(module))
        self.max_graphs = max_graphs
        self.side: torch.cuda.Stream | None = None  # where calls are run before they are recorded
        self.graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()  # least recently used first
        self.seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.pool = None
        # where every parameter and buffer is held: reading these slots is 50x quicker than walking the modules
        self.slots = [(m._parameters, n) for m in module.modules() for n, p in m._parameters.items() if p is not None]
        self.slots += [(m._buffers, n) for m in module.modules() for n, b in m._buffers.items() if b is not None]
        self.weights: tuple = ()

    @property
    def module(self) -> nn.Module:
        return self._module()

    def eager(self, *args, **kwargs) -> torch.Tensor:
        return self._forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        arguments = self.signature.bind(*args, **kwargs).arguments
        if not self._can_replay(arguments):
            return self.eager(**arguments)
        self._check_weights()
        key = tuple((name, _describe(value)) for name, value in arguments.items())
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return self._replay(graph, arguments)
        if key not in self.seen:
            self.seen[key] = None
            while len(self.seen) > MAX_SEEN:
                self.seen.popitem(last=False)
            return self.eager(**arguments)
        return self._record(key, arguments)

    def _can_replay(self, arguments: dict) -> bool:
        tensors = [v for v in arguments.values() if isinstance(v, torch.Tensor)]
        return (not torch.is_grad_enabled() and not self.module.training and bool(tensors)
                and all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing())

    def _check_weights(self) -> None:
        """Forget every graph when any parameter or buffer is a new tensor or moved (``.to()``,
        ``load_state_dict(assign=True)``): the graphs read the old memory. In-place changes need
        nothing: the graphs read the new values (a fraction of a millisecond, against a walk over the
        module's parameters)."""
        weights = tuple(slot[name].data_ptr() for slot, name in self.slots)
        if weights != self.weights:
            self.forget()
            self.weights = weights

    def forget(self) -> None:
        """Drop every graph and its memory (their pool goes with the last of them)."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    def _replay(self, graph: _Graph, arguments: dict) -> torch.Tensor:
        for name, buffer in graph.inputs.items():
            buffer.copy_(arguments[name])
        graph.graph.replay()
        return graph.output.clone()  # the next replay of any graph may write over the buffer

    def _record(self, key: tuple, arguments: dict) -> torch.Tensor:
        """Run the call once on a side stream, then record it; returns that run's output."""
        device = next(v for v in arguments.values() if isinstance(v, torch.Tensor)).device
        with torch.inference_mode(False):  # buffers that a later call under no_grad may copy into too
            static = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in arguments.items()}
        if self.side is None or self.side.device != device:
            self.side = torch.cuda.Stream(device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            output = self.eager(**static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                recorded = self.eager(**static)
        except torch.OutOfMemoryError:
            log.warning("no GPU memory to record a CUDA graph for %s; this shape runs without one", key)
            self.seen.pop(key, None)  # seen again later: tried again, when memory may be free
            return output
        self.graphs[key] = _Graph(graph, {n: v for n, v in static.items() if isinstance(v, torch.Tensor)}, recorded)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return output


def _describe(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return ("value", value)


def set_cuda_graphs(module: nn.Module, enabled: bool) -> bool:
    """Replay ``module``'s sampling calls as CUDA graphs (``GraphedForward``) when ``enabled`` and
    its weights are on a CUDA device; otherwise (or off) its own forward runs. Returns whether
    graphs are on."""
    if "forward" in vars(module):  # a GraphedForward from an earlier call
        del module.forward
    weight = next(module.parameters(), None)
    if not enabled or weight is None or not weight.is_cuda:
        return False
    module.forward = GraphedForward(module)
    return True


def graphed(module: nn.Module) -> GraphedForward | None:
    """The module's ``GraphedForward``, or None when it runs its own forward."""
    forward = vars(module).get("forward")
    return forward if isinstance(forward, GraphedForward) else None
