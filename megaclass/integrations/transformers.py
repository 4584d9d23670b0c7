"""The fused op as the loss of any transformers causal language model, without its [B, T, V] logits.

    from megaclass.integrations.transformers import patch
    model = patch(LlamaForCausalLM(config))
    out = model(input_ids, labels=labels)        # out.loss from megaclass; out.logits is None

One mechanism for every family, no forward copied from transformers: the output layer
(`model.get_output_embeddings()`) gets a forward pre-hook that, during a call with `labels`, keeps its
input (the final hidden states [B, T, D]) and hands the layer an empty slice [B, 0, D] instead, so the
model's own forward runs unchanged and makes no logits; the model's forward is wrapped to take the loss
arguments aside, run it, and compute `ForCausalLMLoss`'s loss from the kept hidden states with
`megaclass.ops.linear_cross_entropy`: labels shifted by one (or `shift_labels` as given), `ignore_index`,
"mean" over the non-ignored tokens or, with `num_items_in_batch`, the sum divided by it. What a family
does to its logits after the output layer is read from its config (Gemma 2/3's
`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`) and checked once, on the
first call with labels: the layer then gets one position per sequence and the model's logits must equal
what the fused loss assumes, else the call raises rather than train on a different loss.

Without `labels` the model runs exactly as before (the hook does nothing).
"""
from __future__ import annotations

import dataclasses
import inspect
import types

import torch
import torch.nn.functional as F

from megaclass.ops import linear_cross_entropy

_STATE = "_megaclass_loss"
"""The patched model's `_Patch` (its presence means: patched)."""
_CAPTURE = "_megaclass_capture"
"""On the output layer, during a call with labels: the `_Capture` its pre-hook fills."""
_HOOKED = "_megaclass_hooked"
"""On the output layer: its pre-hook is registered."""
_MANAGED = frozenset({"bias", "class_start", "process_group", "reduction", "hidden_grad", "weight_grad_into",
                      "softcap", "return_lse"})
"""The op's keywords the integration sets itself (softcap comes from the model's config)."""
LOSS_KWARGS = ("labels", "loss_weights", "num_items_in_batch", "ignore_index", "shift_labels")
"""Forward keywords the patched model takes aside for its loss."""


@dataclasses.dataclass
class _Patch:
    inner: object          # the forward being wrapped (bound to the model)
    options: dict          # loss_options, forwarded to the op
    softcap: float | None  # logits become softcap·tanh(z / softcap) (Gemma 2/3)
    scale: float | None    # logits become scale·z (Cohere, Granite): the op gets scale·hidden
    labels_position: int | None
    verified: bool = False


@dataclasses.dataclass
class _Capture:
    keep: int                    # positions per sequence the output layer still computes (1: verification)
    hidden: torch.Tensor | None = None


def patch(model, **loss_options):
    """Make `model(..., labels=labels)` compute its loss with `megaclass.ops.linear_cross_entropy`.

    model: a transformers causal LM whose `get_output_embeddings()` is a linear layer (weight [V, D],
        optional bias), tied input/output embeddings included. Patched in place and returned.
    loss_options: keywords of the op, e.g. `label_smoothing`, `z_loss`, `class_weight` ([V]),
        `chunk_size`, `implementation` (not those set from the model: bias, softcap, reduction, class
        sharding, return_lse). `ignore_index` here is the default of the forward keyword of that name.

    The patched forward takes, besides the model's own arguments, `labels [B, T]` (ForCausalLMLoss:
    shifted by one inside, -100 ignored), `loss_weights [B, T]` (a non-negative weight per token, aligned
    with `labels`; with `shift_labels`, aligned with those), `num_items_in_batch`, `ignore_index` and
    `shift_labels`. With labels, `out.logits` is None and "mean" is Σ w·CE / number of non-ignored tokens
    (weights default to 1). Patching again only replaces the loss options.
    """
    unknown = sorted(set(loss_options) - _op_keywords())
    if unknown:
        raise TypeError(f"megaclass patch: unknown loss option(s) {unknown}; choose from {sorted(_op_keywords())} "
                        f"(bias, softcap, reduction and return_lse are set by the integration)")
    state = model.__dict__.get(_STATE)
    if state is not None:
        state.options = dict(loss_options)
        return model
    _check_model(model)
    softcap, scale = _logit_transform(model.config)
    inner = model.forward
    signature = inspect.signature(inner)
    positional = [name for name, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    model.__dict__[_STATE] = _Patch(inner=inner, options=dict(loss_options), softcap=softcap, scale=scale,
                                    labels_position=positional.index("labels") if "labels" in positional else None)
    model.forward = types.MethodType(_forward_with_signature(signature), model)
    _hook(model.get_output_embeddings())
    return model


def _op_keywords():
    params = inspect.signature(linear_cross_entropy).parameters
    return {name for name, p in params.items() if p.kind == p.KEYWORD_ONLY} - _MANAGED


def _check_model(model):
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"megaclass patch: {name} is not a transformers model (no config / get_output_embeddings)")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"megaclass patch: {name} is an encoder-decoder model; only causal LMs are supported")
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise TypeError(f"megaclass patch: {name} uses the loss {loss_type!r}; only ForCausalLM is supported")
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"megaclass patch: {name}'s output layer must be a linear layer with a [V, D] weight, "
                        f"got {type(head).__name__}")


def _logit_transform(config):
    """(softcap, scale): what the family applies to the output layer's logits, from its (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)  # Cohere: logits * logit_scale
    if getattr(text, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale = 1.0 / text.logits_scaling
    return (None if softcap is None else float(softcap)), (None if scale is None or scale == 1 else float(scale))


def _hook(head):
    if not head.__dict__.get(_HOOKED):
        head.register_forward_pre_hook(_keep_hidden)
        head.__dict__[_HOOKED] = True


def _keep_hidden(head, args):
    """Pre-hook of the output layer: in a call with labels, keep the hidden states, compute no logits."""
    capture = head.__dict__.get(_CAPTURE)
    if capture is None:
        return None
    if capture.hidden is not None:
        raise RuntimeError("megaclass patch: the output layer ran twice in one forward; its loss cannot be fused")
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        raise RuntimeError("megaclass patch: the output layer must get the hidden states [.., T, D] as its first argument")
    capture.hidden = args[0]
    return (args[0][..., :capture.keep, :], *args[1:])


def _forward_with_signature(signature):
    """The patched forward; its signature is the model's plus `loss_weights` (the Trainer keeps the dataset
    columns that the forward's signature names)."""
    def forward(self, *args, **kwargs):
        return _patched_forward(self, args, kwargs)
    params = list(signature.parameters.values())
    if "loss_weights" not in signature.parameters:
        extra = inspect.Parameter("loss_weights", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    forward.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    return forward


def _patched_forward(model, args, kwargs):
    state = model.__dict__[_STATE]
    labels = kwargs.pop("labels", None)
    loss_weights = kwargs.pop("loss_weights", None)
    if labels is None:
        if loss_weights is not None:
            raise ValueError("megaclass patch: loss_weights were given without labels")
        return state.inner(*args, **kwargs)
    if state.labels_position is not None and len(args) > state.labels_position:
        raise TypeError("megaclass patch: pass `labels` by keyword to a patched model")
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", state.options.get("ignore_index", -100))
    shift_labels = kwargs.pop("shift_labels", None)
    as_tuple = kwargs.get("return_dict") is False
    if as_tuple:
        kwargs["return_dict"] = True
    head = model.get_output_embeddings()
    _hook(head)  # again: resize_token_embeddings replaces the layer
    capture = head.__dict__[_CAPTURE] = _Capture(keep=0 if state.verified else 1)
    try:
        out = state.inner(*args, **kwargs)
    finally:
        del head.__dict__[_CAPTURE]
    if not hasattr(out, "logits"):
        raise TypeError(f"megaclass patch: {type(model).__name__} returned {type(out).__name__}; a patched model "
                        "needs ModelOutput results (config.return_dict=True)")
    if capture.hidden is None:
        raise RuntimeError(f"megaclass patch: {type(model).__name__}'s forward did not call its output layer")
    if not state.verified:
        _verify(model, state, head, capture.hidden, out.logits)
        state.verified = True
    loss = _loss(head, capture.hidden, labels, loss_weights, shift_labels, num_items, ignore_index, state)
    if as_tuple:  # the unpatched layout (loss, logits, cache, …), None where the logits were never made
        return (loss, None, *(value for key, value in out.items() if key not in ("loss", "logits")))
    return type(out)(**{**out, "loss": loss, "logits": None})


def _transform(logits, state):
    """The family's own post-processing of the output layer's logits, as the fused loss applies it."""
    if state.scale is not None:
        logits = logits * state.scale
    if state.softcap is not None:
        logits = torch.tanh(logits / state.softcap) * state.softcap
    return logits


@torch.no_grad()
def _verify(model, state, head, hidden, got):
    """The model's logits of the first position must be the output layer's, transformed as assumed."""
    name = type(model).__name__
    x = hidden[..., :1, :]
    expected = _transform(F.linear(x, head.weight, getattr(head, "bias", None)), state)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise RuntimeError(f"megaclass patch: {name}'s logits ({_shape(got)}) are not its output layer's "
                           f"({_shape(expected)}); its loss cannot be fused")
    eps = max(torch.finfo(got.dtype).eps, torch.finfo(expected.dtype).eps)
    diff = (got.double() - expected.double()).abs().max()
    if not bool(diff <= 16 * eps * (1 + expected.double().abs().max())):
        raise RuntimeError(
            f"megaclass patch: {name} changes its logits after the output layer in a way megaclass does not model "
            f"(its logits differ from the output layer's{_described(state)} by up to {float(diff):.3g}); "
            "its loss cannot be fused. Known: final_logit_softcapping, logit_scale, logits_scaling")


def _described(state):
    parts = ([f" × {state.scale}"] if state.scale is not None else []) + (
        [f" soft-capped at {state.softcap}"] if state.softcap is not None else [])
    return "".join(parts)


def _shape(x):
    return list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _loss(head, hidden, labels, loss_weights, shift_labels, num_items, ignore_index, state):
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"megaclass patch: labels must have the shape of input_ids {list(hidden.shape[:-1])} "
                         f"(logits_to_keep must be 0 with labels), got {_shape(labels)}")
    for name, value in (("loss_weights", loss_weights), ("shift_labels", shift_labels)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != labels.shape):
            raise ValueError(f"megaclass patch: {name} must be a tensor of labels' shape {list(labels.shape)} "
                             f"([batch, sequence], one per token), got {_shape(value)}")
    if loss_weights is not None and not loss_weights.is_floating_point():
        raise ValueError(f"megaclass patch: loss_weights must be floating point, got {loss_weights.dtype}")
    if shift_labels is None:  # position t predicts labels[t + 1]; the last position predicts nothing
        target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        weights = None if loss_weights is None else F.pad(loss_weights, (0, 1), value=0.0)[..., 1:]
        offset = 1
    else:
        target, weights, offset = shift_labels, loss_weights, 0
    x = hidden.reshape(-1, hidden.shape[-1])
    if state.scale is not None:
        x = x * state.scale
    options = dict(state.options, ignore_index=ignore_index)
    if state.softcap is not None:
        options["softcap"] = state.softcap
    try:
        loss = linear_cross_entropy(x, head.weight, target.reshape(-1).to(x.device),
                                    None if weights is None else weights.reshape(-1).to(x.device),
                                    bias=getattr(head, "bias", None),
                                    reduction="mean" if num_items is None else "sum", **options)
    except ValueError as err:
        raise _explain(err, target, weights, ignore_index, head.weight.shape[0], offset) from err
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
    # transformers' loss is fp32 for half-precision models
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


def _explain(err, target, weights, ignore_index, vocab, offset):
    """The op's complaint about a row, in terms of the forward's arguments [batch, position]."""
    def first(mask, values):
        at = tuple(int(i) for i in mask.nonzero()[0])  # in shifted coordinates
        return [*at[:-1], at[-1] + offset], values[at].item()
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        index, value = first(bad, target)
        return ValueError(f"megaclass patch: {'labels' if offset else 'shift_labels'}{index} = {value} is outside "
                          f"the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")
    if weights is not None:
        bad = ~torch.isfinite(weights) | (weights < 0)
        if bool(bad.any()):
            index, value = first(bad, weights)
            return ValueError(f"megaclass patch: loss_weights{index} = {value} must be finite and non-negative")
    return ValueError(f"megaclass patch: {err}")
