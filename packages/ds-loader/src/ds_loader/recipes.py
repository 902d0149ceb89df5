"""Lazy conversion recipes: every target tensor is an expression over source tensors, evaluated on demand.

A recipe is an ordered list of rules; each rule matches source key names (a regular expression, full match)
and says which target tensors they become: a rename or prefix strip, a slice, a concatenation, a reshape or a
half-swap. Planning reads key names and header shapes only; ``Recipe.apply(source)`` returns a
``ConvertedSource``, itself a ``WeightSource``, so ds-vram's disk storage reads converted tensors layer by layer.
Source keys no rule matches keep their names, so strict validation reports them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ds_loader.errors import RecipeError
from ds_vram.sources import TensorInfo, WeightSource

__all__ = [
    "FP8_DTYPES",
    "Concat",
    "ConvertedSource",
    "Expr",
    "Key",
    "Recipe",
    "Reshape",
    "Rule",
    "Slice",
    "SwapHalves",
    "Upcast",
    "drop",
    "fuse",
    "rename",
    "reshape",
    "rule",
    "split",
    "strip_prefix",
    "swap_halves",
]


class Expr:
    """A target tensor as a function of source tensors."""

    def sources(self) -> tuple[str, ...]:
        raise NotImplementedError

    def info(self, source: WeightSource) -> TensorInfo:
        raise NotImplementedError

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Key(Expr):
    """A source tensor as it is (a rename when the target name differs); a zero-copy view for mmap sources."""

    name: str

    def sources(self) -> tuple[str, ...]:
        return (self.name,)

    def info(self, source: WeightSource) -> TensorInfo:
        return source.info(self.name)

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        return source.get(self.name)


@dataclass(frozen=True)
class Slice(Expr):
    """``expr[start:stop]`` along ``dim``; a view, so no copy."""

    expr: Expr
    dim: int
    start: int
    stop: int

    def sources(self) -> tuple[str, ...]:
        return self.expr.sources()

    def info(self, source: WeightSource) -> TensorInfo:
        inner = self.expr.info(source)
        dim = _dim(inner, self.dim, self)
        if not 0 <= self.start <= self.stop <= inner.shape[dim]:
            raise RecipeError(
                f"slice [{self.start}:{self.stop}] of dim {dim} is outside {self.sources()}{inner.shape}"
            )
        shape = list(inner.shape)
        shape[dim] = self.stop - self.start
        return TensorInfo(inner.dtype, tuple(shape))

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        return self.expr.evaluate(source).narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class Concat(Expr):
    """Source tensors joined along ``dim`` (fused projections); the one kind of step that must copy."""

    exprs: tuple[Expr, ...]
    dim: int = 0

    def sources(self) -> tuple[str, ...]:
        return tuple(name for expr in self.exprs for name in expr.sources())

    def info(self, source: WeightSource) -> TensorInfo:
        infos = [expr.info(source) for expr in self.exprs]
        first = infos[0]
        dim = _dim(first, self.dim, self)
        for other in infos[1:]:
            same_rest = len(other.shape) == len(first.shape) and all(
                a == b for i, (a, b) in enumerate(zip(first.shape, other.shape, strict=True)) if i != dim
            )
            if other.dtype != first.dtype or not same_rest:
                parts = ", ".join(f"{n} {i.dtype} {i.shape}" for n, i in zip(self.sources(), infos, strict=False))
                raise RecipeError(f"cannot concatenate along dim {dim}: {parts}")
        shape = list(first.shape)
        shape[dim] = sum(info.shape[dim] for info in infos)
        return TensorInfo(first.dtype, tuple(shape))

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        return torch.cat([expr.evaluate(source) for expr in self.exprs], dim=self.dim)


@dataclass(frozen=True)
class Reshape(Expr):
    expr: Expr
    shape: tuple[int, ...]

    def sources(self) -> tuple[str, ...]:
        return self.expr.sources()

    def info(self, source: WeightSource) -> TensorInfo:
        inner = self.expr.info(source)
        target = TensorInfo(inner.dtype, tuple(self.shape))
        if target.numel != inner.numel:
            raise RecipeError(f"cannot reshape {self.sources()} {inner.shape} to {tuple(self.shape)}")
        return target

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        return self.expr.evaluate(source).reshape(self.shape)


@dataclass(frozen=True)
class SwapHalves(Expr):
    """The two halves of ``dim`` exchanged (diffusers stores adaLN ``scale, shift`` where others store
    ``shift, scale``)."""

    expr: Expr
    dim: int = 0

    def sources(self) -> tuple[str, ...]:
        return self.expr.sources()

    def info(self, source: WeightSource) -> TensorInfo:
        inner = self.expr.info(source)
        if inner.shape[_dim(inner, self.dim, self)] % 2:
            raise RecipeError(f"cannot swap halves of {self.sources()} {inner.shape}: dim {self.dim} is odd")
        return inner

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        first, second = self.expr.evaluate(source).chunk(2, dim=self.dim)
        return torch.cat([second, first], dim=self.dim)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Upcast(Expr):
    """A source tensor cast from FP8 to ``dtype`` when it is stored in FP8 (unchanged otherwise): how every family
    reads FP8 repacks of its checkpoints (exact for e4m3fn into bfloat16), one tensor at a time."""

    expr: Expr
    dtype: torch.dtype = torch.bfloat16

    def sources(self) -> tuple[str, ...]:
        return self.expr.sources()

    def info(self, source: WeightSource) -> TensorInfo:
        inner = self.expr.info(source)
        return TensorInfo(self.dtype, inner.shape) if inner.dtype in FP8_DTYPES else inner

    def evaluate(self, source: WeightSource) -> torch.Tensor:
        tensor = self.expr.evaluate(source)
        return tensor.to(self.dtype) if tensor.dtype in FP8_DTYPES else tensor


def _dim(info: TensorInfo, dim: int, expr: Expr) -> int:
    rank = len(info.shape)
    if not -rank <= dim < rank:
        raise RecipeError(f"dim {dim} is out of range for {expr.sources()} of shape {info.shape}")
    return dim % rank


class KeyInfo:
    """What rules may look at while planning: the source's key names and header infos."""

    def __init__(self, source: WeightSource):
        self._source = source

    def __contains__(self, key: object) -> bool:
        return key in self._source

    def info(self, key: str) -> TensorInfo:
        return self._source.info(key)


RuleFn = Callable[[re.Match[str], KeyInfo], dict[str, Expr]]


@dataclass(frozen=True)
class Rule:
    """Source keys matching ``pattern`` (a full match) become the targets ``fn`` returns ({} drops them)."""

    pattern: re.Pattern[str]
    fn: RuleFn


def rule(pattern: str, fn: RuleFn) -> Rule:
    return Rule(re.compile(pattern), fn)


def rename(pattern: str, replacement: str) -> Rule:
    """Rename keys; ``replacement`` may use groups (``\\1``, ``\\g<name>``)."""
    return rule(pattern, lambda m, _: {m.expand(replacement): Key(m.string)})


def strip_prefix(prefix: str, replacement: str = "") -> Rule:
    """Drop (or replace) a leading prefix, such as ComfyUI's ``model.diffusion_model.``."""
    return rule(re.escape(prefix) + "(.*)", lambda m, _: {replacement + m.group(1): Key(m.string)})


def drop(pattern: str) -> Rule:
    """Ignore source keys the model has no use for (training leftovers, duplicated buffers)."""
    return rule(pattern, lambda m, _: {})


def reshape(pattern: str, replacement: str, shape: Sequence[int] | Callable[[tuple[int, ...]], Sequence[int]]) -> Rule:
    """Rename and reshape; ``shape`` may be a function of the source shape (``lambda s: s[1:]`` drops a batch
    dim whatever the model size)."""

    def fn(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
        target = shape(keys.info(match.string).shape) if callable(shape) else shape
        return {match.expand(replacement): Reshape(Key(match.string), tuple(target))}

    return rule(pattern, fn)


def swap_halves(pattern: str, replacement: str, dim: int = 0) -> Rule:
    return rule(pattern, lambda m, _: {m.expand(replacement): SwapHalves(Key(m.string), dim)})


def split(pattern: str, targets: Sequence[str], dim: int = 0, sizes: Sequence[int] | None = None) -> Rule:
    """One source tensor cut along ``dim`` into ``targets`` (equal parts unless ``sizes`` is given)."""

    def fn(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
        total = keys.info(match.string).shape[dim]
        parts = list(sizes) if sizes is not None else [total // len(targets)] * len(targets)
        if sum(parts) != total:
            raise RecipeError(f"cannot split {match.string} (size {total} on dim {dim}) into parts {parts}")
        result: dict[str, Expr] = {}
        start = 0
        for target, size in zip(targets, parts, strict=True):
            result[match.expand(target)] = Slice(Key(match.string), dim, start, start + size)
            start += size
        return result

    return rule(pattern, fn)


def fuse(pattern: str, target: str, parts: Sequence[str], dim: int = 0) -> Rule:
    """Several source tensors concatenated into one target.

    ``pattern`` must have a named group ``part`` matching one of ``parts``; every part's key is the matched key
    with that group replaced, in the order of ``parts``. E.g. ``fuse(r"(?P<b>.+)\\.to_(?P<part>q|k|v)\\.weight",
    r"\\g<b>.qkv.weight", ["q", "k", "v"])``. A missing part is reported, with the target, when loading.
    """
    compiled = re.compile(pattern)
    if "part" not in compiled.groupindex:
        raise ValueError(f"fuse pattern {pattern!r} needs a named group (?P<part>...)")

    def fn(match: re.Match[str], _: KeyInfo) -> dict[str, Expr]:
        begin, end = match.span("part")
        names = [match.string[:begin] + part + match.string[end:] for part in parts]
        return {match.expand(target): Concat(tuple(Key(name) for name in names), dim)}

    return Rule(compiled, fn)


class Recipe:
    """An ordered list of rules; the first rule matching a source key decides its fate."""

    def __init__(self, *rules: Rule):
        self.rules = rules

    def plan(self, source: WeightSource) -> dict[str, Expr]:
        """Target key -> expression, from key names and header shapes only."""
        keys = KeyInfo(source)
        plan: dict[str, Expr] = {}
        for key in source.keys():  # noqa: SIM118 - a WeightSource need not be iterable
            produced: dict[str, Expr] = {key: Key(key)}
            for candidate in self.rules:
                match = candidate.pattern.fullmatch(key)
                if match is not None:
                    produced = candidate.fn(match, keys)
                    break
            for target, expr in produced.items():
                if plan.setdefault(target, expr) != expr:
                    raise RecipeError(f"recipe maps both {plan[target].sources()} and {expr.sources()} to {target!r}")
        return plan

    def apply(self, source: WeightSource) -> ConvertedSource:
        return ConvertedSource(source, self.plan(source))


class ConvertedSource:
    """A source seen through a recipe: target keys, shapes from headers, tensors computed when asked for."""

    def __init__(self, source: WeightSource, plan: dict[str, Expr]):
        self.source = source
        self.plan = plan
        self._infos: dict[str, TensorInfo] = {}

    def keys(self) -> Iterator[str]:
        return iter(self.plan)

    def __contains__(self, key: object) -> bool:
        return key in self.plan

    def __len__(self) -> int:
        return len(self.plan)

    def __repr__(self) -> str:
        return f"ConvertedSource({self.source!r}, {len(self)} tensors)"

    def _expr(self, key: str) -> Expr:
        try:
            return self.plan[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not produced from {self.source!r}") from None

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            self._infos[key] = self._expr(key).info(self.source)
        return self._infos[key]

    def get(self, key: str) -> torch.Tensor:
        return self._expr(key).evaluate(self.source)

    def sources_of(self, key: str) -> tuple[str, ...]:
        """The source keys a target is computed from (for error messages)."""
        return self._expr(key).sources()
