"""generate() for a TwinMergedModule: transformers' generation with each request's model fixed.

Semantics: served.generate(input_ids, mix_weights=w)[b] = generate of the plain model θ(w_b)
on row b, for every decoding strategy transformers offers (greedy, sampling, beam search,
num_return_sequences, KV caches of every kind, stopping criteria, streamers). The weights of a
request are fixed for all its steps: given by the caller, or computed once by the router on the
prompt (one forward pass of θs, timed apart in `last_call["route_s"]`).

How each mode runs it:
- factored: the module's own generate, once for the batch; every patched layer fits the
  request rows to the rows it sees (`_layers._Rows`: generate expands request b into k
  consecutive rows, its beams or returned sequences).
- materialize: θ(w) merged once into a buffer set, then the module's own generate on it: no
  cost per token. Rows with different weights run as one generate per distinct row (group mode:
  per group), their sequences padded on the right with the pad token and put back in order.
- auto: the cost model of METHOD.md §3 over the whole request: prefill tokens (the prompt's
  rows × k) and decode tokens (rows × k × new tokens) against one merge per distinct row.
"""

import copy
import time
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from twinmerge_ext._layers import _kv_cache, _Rows

FN = "TwinMergedModule.generate"


def _expansion(module, kwargs: Dict[str, Any]):
    """(rows per request k, new tokens at most) of a generate call, from the module's generation
    config updated by the call's arguments as transformers does."""
    config = kwargs.get("generation_config")
    if config is None:
        config = getattr(module, "generation_config", None)
    if config is None:
        return 1, None
    config = copy.deepcopy(config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    k = max(int(config.num_beams or 1), int(config.num_return_sequences or 1))
    return k, config


def _new_tokens(config, prompt_len: int) -> int:
    if config is None:
        return 1
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    if config.max_length is not None:
        return max(1, int(config.max_length) - prompt_len)
    return 1


def _check_inputs(input_ids, attention_mask, kwargs) -> int:
    """B, the number of requests; the prompt tensors checked."""
    if input_ids is None:
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, Tensor) or embeds.dim() != 3:
            raise ValueError(f"{FN}: pass input_ids [B, L] (or inputs_embeds [B, L, d]), got "
                             f"input_ids=None and inputs_embeds={_describe(embeds)}")
        return embeds.shape[0]
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or \
            input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"{FN}: input_ids must be an integer tensor [B, L], got "
                         f"{_describe(input_ids)}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or
                                       attention_mask.shape != input_ids.shape):
        raise ValueError(f"{FN}: attention_mask must be a tensor of input_ids' shape "
                         f"{list(input_ids.shape)}, got {_describe(attention_mask)}")
    return input_ids.shape[0]


def _describe(v) -> str:
    return f"{v.dtype} {list(v.shape)}" if isinstance(v, Tensor) else repr(v)


def generate(wrapped, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
             mix_weights: Optional[Tensor] = None, head_tasks: Optional[Tensor] = None,
             router_text=None, **kwargs):
    """TwinMergedModule.generate (its docstring)."""
    module = wrapped.module
    if not callable(getattr(module, "generate", None)):
        cls = module.__dict__.get("_twin_class", type(module))  # a patched layer's own class
        raise TypeError(f"{FN}: the wrapped module ({cls.__name__}) has no generate(); "
                        f"it must be a transformers generative model (or have its own generate)")
    if "inputs" in kwargs:  # transformers' own name for the prompt
        if input_ids is not None:
            raise TypeError(f"{FN}: pass the prompt as input_ids or as inputs, not both")
        input_ids = kwargs.pop("inputs")
    if "mode" in kwargs:
        raise TypeError(f"{FN}: unexpected argument 'mode': the mode is the wrapper's (set "
                        f"wrapped.mode)")
    with wrapped._calls(FN):
        saved = wrapped._ctx.enter()
        try:
            return _generate(wrapped, input_ids, attention_mask, mix_weights, head_tasks, kwargs,
                             router_text)
        finally:
            wrapped._ctx.leave(saved)


# Options that see the batch's rows (a row index, the whole batch, or its state): one generate
# per weight group would hand each only its group's rows, renumbered from 0.
_WHOLE_BATCH = ("return_dict_in_generate", "streamer", "prefix_allowed_tokens_fn",
                "logits_processor")


def _whole_batch_option(kwargs, config) -> Optional[str]:
    """The first option of the call that needs one generate for the whole batch, or None."""
    cache = _kv_cache(kwargs)
    if cache is not None:
        return f"a KV cache ({cache})"
    for name in _WHOLE_BATCH:
        v = kwargs.get(name, getattr(config, name, None) if config is not None else None)
        if v:
            return f"{name}={v!r}"
    return None


def _generate(wrapped, input_ids, attention_mask, mix_weights, head_tasks, kwargs,
              router_text=None):
    module = wrapped.module
    B = _check_inputs(input_ids, attention_mask, kwargs)
    block = wrapped._calls.pinned.get()
    pinned = block is not None and mix_weights is None
    routed = mix_weights is None and not pinned
    route_s = None
    wrapped._refuse_unread_text(router_text, routed, pinned, FN)
    if pinned:
        mix_weights = block
    elif routed:
        if input_ids is None:
            raise ValueError(f"{FN}: the router reads input_ids; pass them, or mix_weights")
        t0 = time.perf_counter()
        mix_weights = wrapped.route(input_ids, attention_mask=attention_mask,
                                    router_text=router_text)
        route_s = time.perf_counter() - t0
    one_vector = mix_weights.dim() == 1 if isinstance(mix_weights, Tensor) else False
    rw = wrapped._check_weights(mix_weights, B, FN, routed, values=not pinned)
    rw = rw.detach()  # generate records no gradients
    if head_tasks is not None:
        head_tasks = wrapped._check_head_tasks(head_tasks, B, rw.device, FN)
        if head_tasks.dim() != 1:
            raise ValueError(f"{FN}: head_tasks must be [B={B}] (one head per request), got "
                             f"{list(head_tasks.shape)}")
    elif wrapped._head_layer is not None:
        head_tasks = rw.argmax(-1)

    k, config = _expansion(module, kwargs)
    prompt_len = input_ids.shape[1] if input_ids is not None else \
        kwargs["inputs_embeds"].shape[1]
    new = _new_tokens(config, prompt_len)
    prefill, decode = B * k * prompt_len, B * k * new
    mode = "materialize" if pinned else wrapped.mode
    plan: Dict[str, Any] = {"merged_block": True} if pinned else {}
    if B == 0:
        mode, plan = "factored", {"empty_batch": True}
    elif mode == "auto":
        mode, plan = wrapped._cost_plan(rw, one_vector, prefill + decode, passes=1 + new,
                                        rows=B * k)
    elif mode == "group" and one_vector:
        mode = "materialize"
    split = mode in ("materialize", "group") and not (one_vector or pinned) and \
        int(torch.unique(rw, dim=0).shape[0]) > 1
    whole = _whole_batch_option(kwargs, config) if split else None
    if whole is not None:
        if wrapped.mode != "auto":
            raise ValueError(f"{FN}: {whole} needs one generate for the whole batch, but "
                             f"mode {mode!r} runs one per distinct weight row; use "
                             f"mode='factored' or 'auto', or one weight vector per call")
        mode, plan["whole_batch"] = "factored", whole
    plan.update(prefill_tokens=prefill, decode_tokens=decode, rows_per_request=k)
    last = {"mode": mode, "weights": rw, "head_tasks": head_tasks, **plan}
    if route_s is not None:
        last["route_s"] = route_s
    wrapped._calls.last.set(last)
    gen_args = (input_ids,) if input_ids is not None else ()
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    t0 = time.perf_counter()
    if mode == "factored":
        out = _generate_factored(wrapped, gen_args, kwargs, rw, head_tasks)
    elif one_vector or pinned:
        out = _generate_merged(wrapped, rw[0] if not pinned else block, pinned, gen_args,
                               kwargs, head_tasks)
    else:
        out = _generate_groups(wrapped, rw, mode == "group", gen_args, kwargs, head_tasks,
                               config)
    last["generate_s"] = time.perf_counter() - t0
    return out


def _generate_factored(wrapped, args, kwargs, rw: Tensor, head_tasks: Optional[Tensor]):
    ctx = wrapped._ctx
    saved = ctx.row_weights, ctx.head_tasks, ctx.rows
    ctx.row_weights, ctx.head_tasks = rw, head_tasks
    ctx.rows = _Rows(rw, head_tasks)
    try:
        return wrapped.module.generate(*args, **kwargs)
    finally:
        ctx.row_weights, ctx.head_tasks, ctx.rows = saved


def _generate_merged(wrapped, w: Tensor, pinned: bool, args, kwargs,
                     head_tasks: Optional[Tensor]):
    """The module's own generate on θ(w), merged once (or by the merged() block)."""
    rows = _Rows(None, head_tasks) if head_tasks is not None else None
    return wrapped._serve_merged(w, pinned, head_tasks,
                                 lambda: wrapped.module.generate(*args, **kwargs), rows)


def _generate_groups(wrapped, rw: Tensor, group: bool, args, kwargs,
                     head_tasks: Optional[Tensor], config):
    """One merged generate per distinct row (per group), sequences put back in input order."""
    if group:
        member, centers = wrapped.groups(rw)
        wrapped._calls.last.get()["groups"] = member
    else:
        centers, member = torch.unique(rw, dim=0, return_inverse=True)
    what = f"mode {'group' if group else 'materialize'!r} with rows of different weights"
    B = rw.shape[0]
    pad = None if config is None else config.pad_token_id
    if pad is None and config is not None and config.eos_token_id is not None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    outs: List[Tensor] = []
    rows: List[Tensor] = []
    for g in range(centers.shape[0]):
        idx = (member == g).nonzero().flatten()
        if not idx.numel():
            continue
        sub_args = tuple(a[idx.to(a.device)] for a in args)
        sub_kwargs = {n: (v[idx.to(v.device)] if isinstance(v, Tensor) and v.dim() >= 1
                          and v.shape[0] == B else v) for n, v in kwargs.items()}
        h = head_tasks[idx.to(head_tasks.device)] if head_tasks is not None else None
        outs.append(_generate_merged(wrapped, centers[g], False, sub_args, sub_kwargs, h))
        rows.append(idx)
    width = max(o.shape[1] for o in outs)
    if any(o.shape[1] != width for o in outs) and pad is None:
        raise ValueError(f"{FN}: in {what}, the groups' sequences end at different lengths and "
                         f"the generation config has no pad_token_id (nor eos_token_id) to pad "
                         f"them with; pass pad_token_id=")
    # r sequences per request (num_return_sequences): request b's are rows b·r .. b·r + r - 1,
    # in every group's output too.
    r = outs[0].shape[0] // rows[0].numel()
    out = outs[0].new_full((B * r, width), pad if pad is not None else 0)
    for idx, o in zip(rows, outs):
        dst = (idx.to(o.device)[:, None] * r + torch.arange(r, device=o.device)).flatten()
        out[dst, :o.shape[1]] = o
    return out
