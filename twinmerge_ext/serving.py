"""A step-level serving loop for continuous batching: requests join and leave between decode
steps, each with its own weight row and its own rows of one shared KV cache.

Semantics: every request's tokens are those of `served.generate(prompt[None],
mix_weights=w[None], max_new_tokens=n, do_sample=False)` (greedy; or the `select` rule given),
whatever other requests share its steps. One step is one forward of the wrapper over every
request in flight (factored mode: one pass, each row mixed with its own weights), plus one
prefill forward for the requests that joined since the last step.

A plain causal LM (a statically merged model, the base) is served the same way, without weights:
the baseline a twin is compared with, batched alike.

The cache is a transformers DynamicCache of full-attention layers. Requests of different
lengths share it left-padded: each row's keys sit at the right end, padding columns are masked,
and each row gets its own position ids, so padding changes nothing a request attends to. When
requests leave, their rows are dropped, and so are the columns no remaining row uses.
"""

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinmerge_ext._finite import all_finite
from twinmerge_ext.module import TwinMergedModule

__all__ = ["ServeLoop"]

_FROM_CONFIG = object()  # eos_token_id's default: the model's generation config


@dataclass
class _Request:
    id: int
    prompt: Tensor            # [L] int64
    weights: Optional[Tensor]  # [T]; None for a plain model
    max_new_tokens: int
    tokens: List[int] = field(default_factory=list)
    stopped: bool = False     # the stop rule said so


def _greedy(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


def _left_pad(t: Tensor, length: int) -> Tensor:
    """[N, H, S, D] -> [N, H, length, D], zeros in front (masked columns)."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


class ServeLoop:
    """Continuous batching over one TwinMergedModule of a causal LM (module docstring).

    Args:
        served: the wrapper, in mode "factored" or "auto" (materialize and group split a batch
            into sub-batches, and a shared KV cache cannot be split); or a plain causal LM
            (a transformers model with `generate`), whose requests take no weights.
        eos_token_id: int or list of ints that end a request (default: the module's
            generation_config's; None: requests run to their max_new_tokens, as generate's
            eos_token_id=None).
        select: logits [N, V] (float32, the last position of every request in the step) ->
            next tokens [N]; default greedy argmax.
        stop: tokens generated so far (a list of ints, the newest last) -> True once the
            request is complete (it leaves with them), called once per request and step: a
            per-request stopping rule, e.g. "the text holds a newline". Default: none.

    Use: `rid = loop.add(prompt_ids, max_new_tokens, mix_weights=None)` any time (None: the
    router's weights for the prompt, computed now, once); `loop.step()` -> {rid: token} of this
    step; `loop.pop_finished()` -> {rid: generated tokens [n]} of the requests done since the
    last call; `loop.run()` steps until no request is left and returns them all.
    Errors: ValueError/TypeError naming the argument, before the request joins.
    Threads: a loop belongs to one thread (its batch is its own state); several loops, in
    threads of their own, may serve one wrapper at once.
    """

    def __init__(self, served: Union[TwinMergedModule, nn.Module], eos_token_id=_FROM_CONFIG,
                 select: Optional[Callable[[Tensor], Tensor]] = None,
                 stop: Optional[Callable[[List[int]], bool]] = None):
        fn = "ServeLoop"
        self._twin = isinstance(served, TwinMergedModule)
        if not self._twin and not (isinstance(served, nn.Module)
                                   and callable(getattr(served, "generate", None))):
            raise TypeError(f"{fn}: served must be a TwinMergedModule or a causal LM with "
                            f"generate (a transformers model), got {type(served).__name__}")
        if self._twin and served.mode not in ("factored", "auto"):
            raise ValueError(f"{fn}: served.mode must be 'factored' or 'auto' (the requests "
                             f"share one KV cache, which mode {served.mode!r} would split into "
                             f"sub-batches), got {served.mode!r}")
        if select is not None and not callable(select):
            raise TypeError(f"{fn}: select must be callable (logits [N, V]) -> tokens [N], got "
                            f"{type(select).__name__}")
        if stop is not None and not callable(stop):
            raise TypeError(f"{fn}: stop must be callable (tokens so far) -> bool, got "
                            f"{type(stop).__name__}")
        self.model = served.module if self._twin else served
        if eos_token_id is _FROM_CONFIG:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise TypeError(f"{fn}: eos_token_id must be an int, a list of ints or None, got "
                            f"{eos_token_id!r}")
        from transformers import DynamicCache  # the serving loop needs transformers' cache
        self._new_cache = DynamicCache
        self.served = served
        self.eos = frozenset(eos)
        self.select = select or _greedy
        self.stop = stop
        # Logits of the last position only (a prefill's other positions would cost a vocabulary-
        # wide projection each), where the model's forward offers it.
        params = inspect.signature(self.model.forward).parameters
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._ids = itertools.count()
        self._waiting: List[_Request] = []
        self._active: List[_Request] = []      # row i of the cache is _active[i]
        self._finished: Dict[int, Tensor] = {}
        self._cache = None
        self._mask: Optional[Tensor] = None     # [N, S] 1 = a real token of the row
        self._pos: Optional[Tensor] = None      # [N] position of each row's next token

    @property
    def device(self) -> torch.device:
        """Where the served model is now (it may have moved since the loop was made)."""
        return next(self.model.parameters()).device

    # --- requests ---------------------------------------------------------------------------------

    def add(self, input_ids: Tensor, max_new_tokens: int,
            mix_weights: Optional[Tensor] = None, router_text: Optional[str] = None) -> int:
        """Queues a request (it joins at the next step) and returns its id.

        Shape: input_ids [L] (int, no padding, L >= 1); mix_weights [T], or None for the
        router's weights on the prompt (one pass of θs, now; a router that reads text, as a
        TextRouter does, reads router_text, the request's text); for a plain model, None."""
        fn = "ServeLoop.add"
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 1 or \
                input_ids.is_floating_point() or input_ids.is_complex() or not input_ids.numel():
            raise ValueError(f"{fn}: input_ids must be a non-empty 1-D integer tensor [L], got "
                             f"{_describe(input_ids)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"{fn}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        ids = input_ids.to(self.device, torch.long)
        if router_text is not None and not isinstance(router_text, str):
            raise TypeError(f"{fn}: router_text must be a str (the request's text) or None, got "
                            f"{type(router_text).__name__} {router_text!r:.80}")
        if router_text is not None and mix_weights is not None:
            raise ValueError(f"{fn}: router_text is given, but the weights are given "
                             f"(mix_weights), so no router would read it; pass one or the other")
        if not self._twin:
            if mix_weights is not None or router_text is not None:
                what, value = (("mix_weights", mix_weights) if mix_weights is not None
                               else ("router_text", router_text))
                raise ValueError(f"{fn}: {what} needs a TwinMergedModule; this loop serves "
                                 f"a plain {type(self.served).__name__}, got {_describe(value)}")
            req = _Request(next(self._ids), ids, None, max_new_tokens)
            self._waiting.append(req)
            return req.id
        T = len(self.served.tasks)
        if mix_weights is None:
            w = self.served.route(ids[None], attention_mask=torch.ones_like(ids[None]),
                                  router_text=None if router_text is None else [router_text])[0]
        else:
            if not isinstance(mix_weights, Tensor) or not mix_weights.is_floating_point() or \
                    mix_weights.shape != (T,):
                raise ValueError(f"{fn}: mix_weights must be a floating tensor [T={T}] or None, "
                                 f"got {_describe(mix_weights)}")
            w = mix_weights.detach()
        if not all_finite(w):
            raise ValueError(f"{fn}: mix_weights has NaN/Inf entries: {w.tolist()}")
        req = _Request(next(self._ids), ids, w.to(self.device), max_new_tokens)
        self._waiting.append(req)
        return req.id

    @property
    def in_flight(self) -> List[int]:
        """Ids of the requests joined or waiting to join, in order."""
        return [r.id for r in self._active + self._waiting]

    def pop_finished(self) -> Dict[int, Tensor]:
        """{id: generated tokens [n] int64} of the requests finished since the last call."""
        done, self._finished = self._finished, {}
        return done

    def run(self) -> Dict[int, Tensor]:
        """Steps until every request is done; {id: generated tokens} of all finished ones."""
        while self._active or self._waiting:
            self.step()
        return self.pop_finished()

    # --- steps ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Dict[int, int]:
        """One decode step for the requests in flight and the prefill of those that joined:
        {id: its new token}. Finished requests leave the batch (pop_finished).

        A failure leaves the loop as it was before the failing part, so step() can be called
        again: a failed decode is undone; a prefill that fails after the decode went through
        leaves that decode in place (the requests keep their new tokens, those that finished
        are in pop_finished; only this call's return value is lost) and the joiners waiting."""
        out: Dict[int, int] = {}
        if self._active:
            out.update(self._decode())
            self._retire()
        if self._waiting:
            out.update(self._prefill())
            self._retire()
        return out

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, weights: Optional[Tensor], cache):
        mix = {"mix_weights": weights} if self._twin else {}
        logits = self.served(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=True, **mix, **{self._cache_arg: cache},
                             **self._keep).logits
        nxt = self.select(logits[:, -1].float())
        n = ids.shape[0]
        if not isinstance(nxt, Tensor) or nxt.shape != (n,) or nxt.is_floating_point() or \
                nxt.is_complex() or nxt.dtype == torch.bool:
            raise ValueError(f"ServeLoop.step: select must return an integer tensor [N={n}] of "
                             f"next tokens, got {_describe(nxt)}")
        return nxt

    def _stops(self, requests: List[_Request], nxt: Tensor) -> List[bool]:
        """The stop rule on each request's tokens with its next one (nothing changes here)."""
        if self.stop is None:
            return [False] * len(requests)
        return [bool(self.stop(r.tokens + [t])) for r, t in zip(requests, nxt.tolist())]

    def _decode(self) -> Dict[int, int]:
        """One step of every joined request. The cache grows by a column in the forward; if the
        step fails (the forward, select, stop), that column is cropped again and nothing else
        has changed, so the step can be retried."""
        last = torch.tensor([r.tokens[-1] for r in self._active], device=self.device)
        S = self._mask.shape[1]
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._active), 1)], 1)
        try:
            nxt = self._forward(last[:, None], mask, self._pos[:, None], self._weights(),
                                self._cache)
            stops = self._stops(self._active, nxt)
        except BaseException:
            for layer in self._layers(self._cache):
                if layer.keys is not None and layer.keys.shape[-2] > S:
                    layer.keys, layer.values = layer.keys[..., :S, :], layer.values[..., :S, :]
            raise
        self._mask, self._pos = mask, self._pos + 1
        return self._take(self._active, nxt, stops)

    def _prefill(self) -> Dict[int, int]:
        """The prefill of the waiting requests, in a cache of their own, joined to the running
        one only when it succeeded (on failure they are still waiting)."""
        joining = self._waiting
        L = max(r.prompt.numel() for r in joining)
        ids = torch.zeros(len(joining), L, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(joining):
            n = r.prompt.numel()
            ids[i, L - n:], mask[i, L - n:] = r.prompt, 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self._new_cache()
        weights = torch.stack([r.weights for r in joining]) if self._twin else None
        nxt = self._forward(ids, mask, pos, weights, cache)
        stops = self._stops(joining, nxt)
        self._waiting = self._waiting[len(joining):]
        self._join(joining, cache, mask)
        return self._take(joining, nxt, stops)

    def _join(self, joining: List[_Request], cache, mask: Tensor) -> None:
        """The joining requests' cache rows appended to the running cache, both left-padded to
        one length."""
        lengths = mask.sum(1)
        if self._cache is None:
            self._cache, self._mask, self._pos = cache, mask, lengths
        else:
            S = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._layers(self._cache), self._layers(cache)):
                mine.keys = torch.cat([_left_pad(mine.keys, S), _left_pad(theirs.keys, S)])
                mine.values = torch.cat([_left_pad(mine.values, S), _left_pad(theirs.values, S)])
            self._mask = torch.cat([F.pad(self._mask, (S - self._mask.shape[1], 0)),
                                    F.pad(mask, (S - mask.shape[1], 0))])
            self._pos = torch.cat([self._pos, lengths])
        self._active.extend(joining)

    def _layers(self, cache):
        from transformers.cache_utils import DynamicLayer
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise ValueError(f"ServeLoop: the model's cache has a {type(layer).__name__}; "
                                 f"the loop serves full-attention DynamicLayer caches only")
            yield layer

    def _take(self, requests: List[_Request], nxt: Tensor, stops: List[bool]) -> Dict[int, int]:
        out = {}
        for r, t, stopped in zip(requests, nxt.tolist(), stops):
            r.tokens.append(t)
            r.stopped = stopped
            out[r.id] = t
        return out

    def _weights(self) -> Optional[Tensor]:
        return torch.stack([r.weights for r in self._active]) if self._twin else None

    def _retire(self) -> None:
        keep = []
        for i, r in enumerate(self._active):
            if len(r.tokens) >= r.max_new_tokens or r.tokens[-1] in self.eos or r.stopped:
                self._finished[r.id] = torch.tensor(r.tokens, dtype=torch.long)
            else:
                keep.append(i)
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask, self._pos = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask[idx]
        first = int(mask.any(0).nonzero()[0])  # columns before it are padding in every row
        for layer in self._layers(self._cache):
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self._active = [self._active[i] for i in keep]
        self._mask, self._pos = mask[:, first:], self._pos[idx]


def _describe(v) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, Tensor) else repr(v)
