"""Calibration: feeding model inputs, capturing each Linear's inputs with hooks, and the sequential
engine that prunes a model layer group by layer group so that later layers see pruned inputs.

Calibration items are what the model's forward takes: a tensor (`model(x)`), a dict / BatchEncoding
(`model(**x)`, transformers models) or a tuple (`model(*x)`). A dict's 2-D "attention_mask" marks
padding: padded tokens are left out of every statistic.

The engine (`SequentialPruner`) follows SparseGPT / GPTQ's layer-wise scheme, generalised:
1. one traced forward orders the target Linears by first call and groups those that read the same
   input tensor (q/k/v, gate/up), so each group needs one statistic (one Hessian);
2. if the model has a stack of identical blocks (a ModuleList / Sequential of transformer layers),
   the inputs of the first block are captured once, and each block is then run on its own,
   group by group: hooks collect the group's statistics, the group is pruned, the next group
   sees the pruned outputs; the pruned block's outputs become the next block's inputs;
3. Linears outside the blocks (or every Linear of a model without blocks) are handled one group at
   a time with full forward passes that stop as soon as the group has been seen.
Only the statistics of the current stage are alive at any time (SparseGPT: one Hessian)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Calibration", "ColumnMoments", "Hessian", "SequentialPruner", "SquaredNorms", "StopForward", "call_model",
    "collect_stats", "find_blocks",
]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the statistics it was run for are collected."""


def module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, item):
    """model(item) as the calibration item's kind asks. An error inside the model's forward is
    re-raised as a ValueError that says a calibration item caused it (with the original chained)."""
    try:
        if isinstance(item, Mapping):
            return model(**item)
        if isinstance(item, (list, tuple)):
            return model(*item)
        return model(item)
    except StopForward:
        raise
    except Exception as e:
        raise ValueError(f"the model's forward failed on a calibration item ({type(e).__name__}: {e}); calibration "
                         "items are the model's inputs: a tensor for model(x), a dict for model(**x), a tuple for "
                         "model(*x)") from e


def _mask_2d(mask) -> torch.Tensor | None:
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def token_mask_of(item) -> torch.Tensor | dict | None:
    """Which tokens of a calibration item are real (padding is left out of the statistics): its
    attention_mask; for an encoder-decoder item (decoder_* inputs), one mask per stream, as the
    encoder's mask does not describe the decoder's tokens."""
    if not isinstance(item, Mapping):
        return None
    mask = _mask_2d(item.get("attention_mask"))
    if any(str(key).startswith("decoder_") for key in item):
        return {"encoder": mask, "decoder": _mask_2d(item.get("decoder_attention_mask"))}
    return mask


# A decoder's cross-attention keys and values read the encoder's tokens (BART/Marian/Whisper
# encoder_attn, T5 EncDecAttention, BERT-generation crossattention).
CROSS_ATTENTION = {"encoder_attn", "EncDecAttention", "crossattention", "cross_attn"}
KEY_VALUE = {"k_proj", "v_proj", "k", "v", "key", "value"}


def mask_for(mask: torch.Tensor | dict | None, name: str, x: torch.Tensor | None = None) -> torch.Tensor | None:
    """The token mask of the stream Linear `name` reads: the decoder's under a module named decoder,
    except a cross-attention's keys and values, which read the encoder's tokens. With `x` (the
    Linear's input), the other stream's mask is taken where only that one fits x's tokens."""
    if not isinstance(mask, dict):
        return mask
    parts = name.split(".")
    reads_encoder = bool(CROSS_ATTENTION & set(parts)) and parts[-1] in KEY_VALUE
    stream = "decoder" if "decoder" in parts and not reads_encoder else "encoder"
    chosen, other = mask[stream], mask["decoder" if stream == "encoder" else "encoder"]
    if x is not None and chosen is not None and other is not None and tuple(x.shape[:-1]) != tuple(chosen.shape) \
            and tuple(x.shape[:-1]) == tuple(other.shape):
        return other  # (an unmasked stream stays unmasked: its tokens may match the other's in number)
    return chosen


class Calibration:
    """A materialised list of calibration items on the model's device (an iterator is consumed once,
    but the engine makes several passes), each with its token mask."""

    def __init__(self, model: nn.Module, calibration: Iterable):
        if isinstance(calibration, (torch.Tensor, Mapping)):
            calibration = [calibration]
        device = module_device(model)
        if not isinstance(calibration, Iterable):
            raise TypeError(f"calibration must be an iterable of model inputs, got {type(calibration).__name__}")
        self.items = [to_device(item, device) for item in calibration]
        for i, item in enumerate(self.items):
            if not isinstance(item, (torch.Tensor, Mapping, list, tuple)):
                raise TypeError(f"calibration item {i} is a {type(item).__name__}: items are a tensor for model(x), a "
                                "dict for model(**x) or a tuple for model(*x)")
        if not self.items:
            raise ValueError("calibration is empty: pass an iterable of model inputs")
        self.masks = [token_mask_of(item) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)


def flat_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear input [..., K] as float32 rows [tokens, K], padded tokens dropped."""
    x = x.detach()
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1]).float()


class SquaredNorms:
    """Sum over tokens of x_j**2 per input feature (what Wanda and OWL need)."""

    def __init__(self, features: int, device=None):
        self.sum_sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        self.sum_sq += rows.square().sum(0, dtype=torch.float64)
        self.count += rows.shape[0]


class ColumnMoments(SquaredNorms):
    """Per-feature sum and sum of squares: mean, variance and norm of each input feature."""

    def __init__(self, features: int, device=None):
        super().__init__(features, device)
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        super().add(rows)
        self.sum += rows.sum(0, dtype=torch.float64)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.count)

    @property
    def var(self) -> torch.Tensor:
        return (self.sum_sq / max(1, self.count) - self.mean.square()).clamp_min(0)


class Hessian:
    """H = X^T X over the calibration tokens in float32 (SparseGPT's 2/N factor does not change the
    result, dampening is relative to mean(diag H)). For wide inputs only the lower block triangle
    is accumulated (about half the flops of a full X^T X per batch) and mirrored once, when `H` is
    read."""

    LOWER_ONLY_FROM = 4096  # input features
    BLOCK = 1024

    def __init__(self, features: int, device=None):
        self._H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self._lower_only = features >= self.LOWER_ONLY_FROM
        self._mirrored = True
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        k = self._H.shape[0]
        if self._lower_only:
            for j0 in range(0, k, self.BLOCK):
                j1 = min(j0 + self.BLOCK, k)
                self._H[j0:, j0:j1].addmm_(rows[:, j0:].T, rows[:, j0:j1])
            self._mirrored = False
        else:
            self._H.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            k, b = self._H.shape[0], self.BLOCK
            for i0 in range(0, k, b):
                i1 = min(i0 + b, k)
                diag = self._H[i0:i1, i0:i1]
                diag.copy_(diag.tril() + diag.tril(-1).T)
                if i1 < k:
                    self._H[i0:i1, i1:].copy_(self._H[i1:, i0:i1].T)
            self._mirrored = True
        return self._H

    @property
    def sum_sq(self) -> torch.Tensor:
        return self._H.diagonal().double()


def find_blocks(model: nn.Module, targets: Mapping[str, nn.Module]) -> tuple[str, list[nn.Module]] | None:
    """The stack of repeated blocks holding the most target Linears: an nn.ModuleList or
    nn.Sequential of >= 2 children of one class, none a Linear, each holding a target."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or isinstance(children[0], nn.Linear):
            continue
        prefix = f"{name}." if name else ""
        counts = [sum(1 for t in targets if t.startswith(f"{prefix}{i}.")) for i in range(len(children))]
        if min(counts) == 0:
            continue
        if sum(counts) > best_count:
            best, best_count = (name, children), sum(counts)
    return best


@dataclass
class _Trace:
    order: list[str] = field(default_factory=list)  # first-call order
    input_key: dict[str, tuple] = field(default_factory=dict)
    # The traced inputs are kept alive until grouping is done, so that no two of them can share an
    # address (a freed tensor's memory is often reused for the next one of the same shape).
    inputs: list[torch.Tensor] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    first_block_call: int | None = None


def _input_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


def progress_bar(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    # None: show the bar only on long runs (after 2 s), on stderr; False: never; True: always.
    return tqdm(total=total, desc=desc, disable=progress is False, delay=0 if progress else 2.0, leave=False,
                file=sys.stderr, unit="stage")


class _Hooks:
    """Forward hooks that feed each Linear's input to its accumulators and stop the forward pass
    once every Linear of the stage has been called as often as in the trace."""

    def __init__(self, modules: Mapping[str, nn.Module], stats: Mapping[str, object], calls: Mapping[str, int],
                 early_stop: bool):
        self.stats, self.calls, self.early_stop = stats, calls, early_stop
        self.mask: torch.Tensor | None = None
        self.seen: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            acc = self.stats.get(name)
            if acc is not None:
                acc.add(flat_rows(inputs[0], mask_for(self.mask, name, inputs[0])))
            self.seen[name] = self.seen.get(name, 0) + 1
            if self.early_stop and all(self.seen.get(n, 0) >= c for n, c in self.calls.items()):
                raise StopForward

        return hook

    def start(self, mask: torch.Tensor | dict | None) -> None:
        self.mask, self.seen = mask, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _CalibrationMode:
    """eval(), no grad, no KV cache while calibrating; restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.config = getattr(self.model, "config", None)
        self.use_cache = getattr(self.config, "use_cache", None)
        if self.use_cache:
            self.config.use_cache = False
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self.training)
        torch.set_grad_enabled(self.grad)
        if self.use_cache:
            self.config.use_cache = self.use_cache
        return False


def collect_stats(model: nn.Module, calib: Calibration, modules: Mapping[str, nn.Module],
                  make: Callable[[str, nn.Module], object]) -> dict[str, object]:
    """One pass of the (unpruned) model with an accumulator `make(name, module)` on each module."""
    stats = {name: make(name, m) for name, m in modules.items()}
    with _CalibrationMode(model):
        hooks = _Hooks(modules, stats, {}, early_stop=False)
        try:
            for item, mask in zip(calib.items, calib.masks, strict=True):
                hooks.start(mask)
                call_model(model, item)
        finally:
            hooks.remove()
    return stats


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class SequentialPruner:
    """Runs `stage_stats(names) -> {name: accumulator}` then `apply(names, stats)` for each stage of
    target Linears, in execution order, each stage seeing the already pruned earlier layers.

    `per_block=True` makes each block one stage (Wanda: statistics of a block from its dense self,
    as in the paper); otherwise each group of Linears sharing an input is a stage (SparseGPT, true
    sequential). Returns the names that were never called during calibration (left untouched)."""

    def __init__(self, model: nn.Module, calib: Calibration, targets: Mapping[str, nn.Module],
                 progress: bool | None = None, desc: str = "pruning"):
        self.model, self.calib, self.targets = model, calib, dict(targets)
        self.progress, self.desc = progress, desc
        self.blocks = find_blocks(model, self.targets)

    def _block_of(self, name: str) -> int | None:
        if self.blocks is None:
            return None
        prefix = f"{self.blocks[0]}." if self.blocks[0] else ""
        if not name.startswith(prefix):
            return None
        head = name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks[1]) else None

    def trace(self) -> _Trace:
        trace = _Trace()
        item = self.calib.items[0]

        def hook_for(name):
            def hook(module, inputs, output):
                if name not in trace.calls:
                    trace.order.append(name)
                    trace.input_key[name] = _input_key(inputs[0])
                    trace.inputs.append(inputs[0])
                trace.calls[name] = trace.calls.get(name, 0) + 1

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.targets.items()]
        block_calls: list[list[tuple]] = []
        if self.blocks is not None:
            def block_hook(module, args):
                if trace.first_block_call is None:
                    trace.first_block_call = len(trace.order)

            handles.append(self.blocks[1][0].register_forward_pre_hook(block_hook))
            block_calls = [[] for _ in self.blocks[1]]
            for i, block in enumerate(self.blocks[1]):
                handles.append(block.register_forward_hook(
                    lambda module, args, kwargs, output, i=i: block_calls[i].append((args, kwargs, output)),
                    with_kwargs=True))
        try:
            call_model(self.model, item)
        finally:
            for h in handles:
                h.remove()
        if self.blocks is not None and not _chained(block_calls):
            # Block by block would feed each block the previous one's output and the first one's
            # other arguments: wrong here, so every stage runs the whole model instead.
            self.blocks = None
            trace.first_block_call = None
        return trace

    @staticmethod
    def groups(order: list[str], trace: _Trace) -> list[list[str]]:
        """Consecutive Linears (in call order) that read the same input tensor, each called once per
        forward: one called again on other inputs needs a Hessian of its own (a shared one covered
        only the first call)."""
        out: list[list[str]] = []
        for name in order:
            once = trace.calls.get(name, 1) == 1 and bool(out) and trace.calls.get(out[-1][-1], 1) == 1
            if once and trace.input_key[out[-1][-1]] == trace.input_key[name]:
                out[-1].append(name)
            else:
                out.append([name])
        return out

    def run(self, stage_stats: Callable[[list[str]], dict], apply: Callable[[list[str], dict], None],
            per_block: bool = False) -> list[str]:
        with _CalibrationMode(self.model):
            trace = self.trace()
            first_block = trace.first_block_call if self.blocks is not None else None
            pre, post, in_block = [], [], {}
            for i, name in enumerate(trace.order):
                b = self._block_of(name)
                if b is not None and first_block is not None:
                    in_block.setdefault(b, []).append(name)
                elif first_block is not None and i < first_block:
                    pre.append(name)
                else:
                    post.append(name)
            if self.blocks is not None and first_block is None:  # blocks never ran: treat all as outer
                post = trace.order
                in_block = {}
            block_stages = {b: ([names] if per_block else self.groups(names, trace)) for b, names in in_block.items()}
            pre_stages, post_stages = self.groups(pre, trace), self.groups(post, trace)
            trace.inputs.clear()
            uncalled = [n for n in self.targets if n not in trace.calls]
            total = len(pre_stages) + sum(len(s) for s in block_stages.values()) + len(post_stages) + len(uncalled)
            with progress_bar(total, self.desc, self.progress) as bar:
                for stage in pre_stages:
                    self._model_stage(stage, trace, stage_stats, apply)
                    bar.update()
                if block_stages:
                    self._blocks(block_stages, trace, stage_stats, apply, bar)
                for stage in post_stages:
                    self._model_stage(stage, trace, stage_stats, apply)
                    bar.update()
                never = []
                for name in uncalled:  # e.g. MoE experts the first item did not route to: full passes
                    stats = stage_stats([name])
                    self._passes(self.model, {name: self.targets[name]}, stats, {}, None)
                    if all(getattr(acc, "count", 0) > 0 for acc in stats.values()):
                        apply([name], stats)
                    else:
                        never.append(name)
                    bar.update()
        return never

    def _passes(self, runner, modules, stats, calls, inputs) -> None:
        hooks = _Hooks(modules, stats, calls, early_stop=bool(calls))
        try:
            for i, mask in enumerate(self.calib.masks):
                hooks.start(mask)
                try:
                    if inputs is None:
                        call_model(runner, self.calib.items[i])
                    else:
                        args, kwargs = inputs[i]
                        runner(*args, **kwargs)
                except StopForward:
                    pass
        finally:
            hooks.remove()

    def _model_stage(self, names, trace, stage_stats, apply) -> None:
        stats = stage_stats(names)
        calls = {n: trace.calls[n] for n in names}
        self._passes(self.model, {n: self.targets[n] for n in names}, stats, calls, None)
        apply(names, stats)

    def _block_inputs(self) -> list[tuple[tuple, dict]]:
        captured: list[tuple[tuple, dict]] = []

        def grab(module, args, kwargs):
            kwargs = dict(kwargs)
            for key in _CACHE_KWARGS:
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            captured.append((tuple(args), kwargs))
            raise StopForward

        handle = self.blocks[1][0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for item in self.calib.items:
                try:
                    call_model(self.model, item)
                except StopForward:
                    pass
        finally:
            handle.remove()
        if len(captured) != len(self.calib.items):
            raise RuntimeError("the first block was not called for every calibration item")
        return captured

    def _blocks(self, block_stages, trace, stage_stats, apply, bar) -> None:
        inputs = self._block_inputs()
        for b, block in enumerate(self.blocks[1]):
            for names in block_stages.get(b, []):
                stats = stage_stats(names)
                calls = {n: trace.calls[n] for n in names}
                self._passes(block, {n: self.targets[n] for n in names}, stats, calls, inputs)
                apply(names, stats)
                bar.update()
            if b + 1 < len(self.blocks[1]):
                inputs = [_next_inputs(block, args, kwargs) for args, kwargs in inputs]


def _hidden_of(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("hidden_states")


def _same(a, b) -> bool:
    """The same argument value: one tensor, or equal tensors (containers compared item by item)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or bool(torch.equal(a, b))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects that cannot be compared are not the same
        return a is b


def _chained(block_calls: list[list[tuple]]) -> bool:
    """Whether the traced blocks form a chain that can be run one block at a time: each called once,
    each reading the previous one's output as its hidden states, all with the first one's other
    arguments. Not so with a residual added by the parent, parallel branches, per-layer attention
    masks (sliding-window layers) or arguments a block hands on (T5's position bias)."""
    if any(len(calls) != 1 for calls in block_calls):
        return False
    def others(kwargs: dict) -> dict:  # the arguments besides the hidden states and caches
        return {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}

    calls = [c[0] for c in block_calls]
    first_args, first_kwargs, _ = calls[0]
    first_others = others(first_kwargs)
    for (_, _, previous), (args, kwargs, _) in zip(calls[:-1], calls[1:], strict=True):
        if not _same(_hidden_of(args, kwargs), _hidden_out(previous)):
            return False
        if not (_same(args[1:], first_args[1:]) and _same(others(kwargs), first_others)):
            return False
    return True


def _hidden_out(out):
    """The hidden states a block returns: the tensor, or the first item of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    out = block(*args, **kwargs)
    hidden = _hidden_out(out)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise TypeError("cannot tell which block argument carries the hidden states")
