"""Seeded random directions, one stream per seed (docs/protocols.md, "Directions").

Determinism contract :data:`DIRECTIONS_CONTRACT`. The direction ``u(s)`` of seed ``s`` is one stream
of float32 values laid over a segment's trainable parameters (``named_parameters()`` order,
``requires_grad`` only), flattened and concatenated: parameter ``i`` takes the ``numel`` values that
follow those of the parameters before it, from stream position ``offset`` on (ZO-SFL's server segment
continues the client's stream after its ``d_c`` values). The stream is cut into blocks of
:data:`STREAM_BLOCK` values; block ``k`` is drawn by a CPU ``torch.Generator`` seeded with
:func:`block_seed` ``(s, k)``:

- ``gaussian`` (the default): the generator's ``normal_`` stream (what ``torch.randn`` draws);
- ``rademacher``: its ``random_(0, 2)`` stream mapped to ``±1``, each sign with probability 1/2.

A segment draws each block it covers once per seed, only as far as it needs: ``normal_`` transforms
its uniforms in groups of 16, so a draw of a multiple of 16 values is a prefix of any longer draw of
the same block (``random_`` draws one value at a time). The values are then moved to each parameter's
device and dtype, so a direction does not depend on where a parameter lives, nor on the thread count
(the CPU generator draws serially).

Contract 1 (before) seeded one generator per ``(seed, parameter index)``; its checkpoints and ledgers
are refused (:func:`check_contract`).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_MASK64 = (1 << 64) - 1

DIRECTIONS_CONTRACT = 2
"""Version of the determinism contract of directions (written into checkpoints and ledger records)."""

DISTRIBUTIONS = ("gaussian", "rademacher")
"""Distributions of the entries of a direction: standard normal, or ``±1`` with equal probability."""

STREAM_BLOCK = 1 << 16
"""Values per block of a seed's stream (a multiple of 16); each block has its own generator seed."""

_GRAIN = 16
"""``normal_`` transforms uniforms in groups of this many: draws are rounded up to a multiple of it."""

_PREPARED_LIMIT = 64
"""Parameter layouts whose buffers one thread keeps (each at most two blocks of floats, 512 KiB)."""


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit generator seed (order matters, no collisions by sum)."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


@functools.lru_cache(maxsize=1 << 16)
def block_seed(seed: int, block: int) -> int:
    """Generator seed of block ``block`` of seed ``seed``'s stream: ``mix_seed(DIRECTIONS_CONTRACT, seed, block)``."""
    return mix_seed(DIRECTIONS_CONTRACT, seed, block)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a zeroth-order step perturbs: ``named_parameters()`` order, trainable only."""
    return [p for _, p in module.named_parameters() if p.requires_grad]


def trainable_names(module: nn.Module) -> list[str]:
    """Names matching :func:`trainable_parameters`, in the same order."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def stream_length(params: Iterable[torch.Tensor]) -> int:
    """Stream values the parameters take (their total number of elements): the next segment's ``offset``."""
    return sum(p.numel() for p in params)


def _unknown_distribution(distribution: object) -> ValueError:
    return ValueError(f"unknown direction distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")


def check_distribution(distribution: str) -> str:
    """Return ``distribution`` if it is one of :data:`DISTRIBUTIONS`, else raise ``ValueError``."""
    if distribution not in DISTRIBUTIONS:
        raise _unknown_distribution(distribution)
    return distribution


def check_contract(contract: object, what: str) -> None:
    """Raise ``ValueError`` (one line naming ``what``) unless ``contract`` is :data:`DIRECTIONS_CONTRACT`.

    ``None`` stands for a state written before contracts were recorded (contract 1).
    """
    if contract != DIRECTIONS_CONTRACT:
        found = 1 if contract is None else contract
        raise ValueError(
            f"{what} was written under directions contract {found!r}; this version draws directions under contract "
            f"{DIRECTIONS_CONTRACT} (one stream per seed), so its θ_c cannot be replayed: start a new run"
        )


def _round_up(count: int) -> int:
    return -(-count // _GRAIN) * _GRAIN


def _fill_(buffer: torch.Tensor, generator: torch.Generator, seed: int, block: int, distribution: str) -> None:
    """Overwrite a contiguous float32 CPU tensor with the first values of block ``block`` of ``seed``'s stream."""
    generator.manual_seed(block_seed(seed, block))
    if distribution == "gaussian":
        buffer.normal_(generator=generator)
    elif distribution == "rademacher":
        buffer.random_(0, 2, generator=generator).mul_(2.0).sub_(1.0)
    else:
        raise _unknown_distribution(distribution)


@torch.no_grad()
def stream_values(seed: int, start: int, count: int, distribution: str = "gaussian") -> torch.Tensor:
    """Values ``start .. start + count − 1`` of ``seed``'s stream, as a new float32 CPU tensor (the contract,
    spelled out with a fresh generator per block)."""
    check_distribution(distribution)
    out = torch.empty(count, dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    position, written = start, 0
    while written < count:
        block, at = divmod(position, STREAM_BLOCK)
        take = min(STREAM_BLOCK - at, count - written)
        values = torch.empty(_round_up(at + take), dtype=torch.float32)
        _fill_(values, generator, seed, block, distribution)
        out[written : written + take] = values[at : at + take]
        position, written = position + take, written + take
    return out


@dataclass(frozen=True)
class Piece:
    """The part of parameter ``position`` that lies in one block: its elements ``start:stop`` (flattened)
    are the block's values ``at:at + stop − start``; ``whole`` when that is all of the parameter."""

    position: int
    start: int
    stop: int
    at: int
    whole: bool


@dataclass(frozen=True)
class Block:
    """One block of the stream as a segment covers it: values ``lo:hi`` of block ``index`` (``draw`` are drawn)."""

    index: int
    lo: int
    hi: int
    draw: int
    pieces: tuple[Piece, ...]


@functools.lru_cache(maxsize=1024)
def stream_layout(shapes: tuple[torch.Size, ...], offset: int = 0) -> tuple[Block, ...]:
    """The blocks a segment with parameters of ``shapes`` covers from stream position ``offset``."""
    pieces: dict[int, list[Piece]] = {}
    position_in_stream = offset
    for position, shape in enumerate(shapes):
        numel = shape.numel()
        start = 0
        while start < numel:
            block, at = divmod(position_in_stream + start, STREAM_BLOCK)
            stop = min(numel, start + STREAM_BLOCK - at)
            pieces.setdefault(block, []).append(Piece(position, start, stop, at, start == 0 and stop == numel))
            start = stop
        position_in_stream += numel
    blocks = []
    for index in sorted(pieces):
        parts = tuple(pieces[index])
        lo, hi = parts[0].at, parts[-1].at + parts[-1].stop - parts[-1].start
        blocks.append(Block(index, lo, hi, _round_up(hi), parts))
    return tuple(blocks)


class _Prepared:
    """A layout's buffers in one thread: a drawn block and a gradient block, with views of each piece."""

    def __init__(self, shapes: tuple[torch.Size, ...], blocks: tuple[Block, ...]) -> None:
        self.blocks = blocks
        size = max((block.draw for block in blocks), default=0)
        self.values = torch.empty(size, dtype=torch.float32)
        self.grad = torch.empty(size, dtype=torch.float32)
        self.drawn = [self.values[: block.draw] for block in blocks]
        self.value_views = [_piece_views(self.values, block, shapes) for block in blocks]
        self.grad_regions = [self.grad[block.lo : block.hi] for block in blocks]
        self.value_regions = [self.values[block.lo : block.hi] for block in blocks]
        self.grad_views = [_piece_views(self.grad, block, shapes) for block in blocks]


def _piece_views(buffer: torch.Tensor, block: Block, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Views of ``buffer`` for each piece of ``block``: shaped like the parameter when whole, else flat."""
    views = []
    for piece in block.pieces:
        view = buffer[piece.at : piece.at + piece.stop - piece.start]
        views.append(view.view(shapes[piece.position]) if piece.whole else view)
    return views


class _ThreadState(threading.local):
    """One CPU generator and the prepared layouts of one thread (a generator is not safe to share)."""

    def __init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        self.prepared: dict[tuple, _Prepared] = {}

    def prepare(self, params: Sequence[torch.Tensor], offset: int) -> _Prepared:
        shapes = tuple(p.shape for p in params)
        key = (offset, shapes)
        prepared = self.prepared.get(key)
        if prepared is None:
            if len(self.prepared) >= _PREPARED_LIMIT:
                self.prepared = {}
            prepared = self.prepared[key] = _Prepared(shapes, stream_layout(shapes, offset))
        return prepared


_THREAD = _ThreadState()


def _flat(param: torch.Tensor) -> torch.Tensor:
    if not param.is_contiguous():
        raise ValueError(f"a parameter of shape {tuple(param.shape)} larger than one stream block is not contiguous")
    return param.view(-1)


def piece_targets(params: Sequence[torch.Tensor], block: Block) -> list[torch.Tensor]:
    """The parameters (or flat slices of them) that ``block``'s pieces cover, in piece order."""
    return [params[p.position] if p.whole else _flat(params[p.position])[p.start : p.stop] for p in block.pieces]


def _add_(targets: list[torch.Tensor], sources: list[torch.Tensor], scale: float) -> None:
    if all(t.dtype is torch.float32 and t.is_cpu for t in targets):
        torch._foreach_add_(targets, sources, alpha=scale)
    else:
        for target, source in zip(targets, sources):
            target.add_(source.to(device=target.device, dtype=target.dtype), alpha=scale)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, offset: int = 0, distribution: str = "gaussian") -> None:
    """In place: ``θ += scale · u(seed)`` over ``params`` (MeZO-style: one block of the stream at a time).

    ``offset`` is the stream position of ``params[0]``'s first element (:func:`stream_length` of the
    segments before it).
    """
    state = _THREAD
    prepared = state.prepare(params, offset)
    for b, block in enumerate(prepared.blocks):
        _fill_(prepared.drawn[b], state.generator, seed, block.index, distribution)
        _add_(piece_targets(params, block), prepared.value_views[b], scale)


@torch.no_grad()
def seed_direction(
    params: Sequence[torch.Tensor], seed: int, offset: int = 0, distribution: str = "gaussian"
) -> list[torch.Tensor]:
    """``u(seed)`` as new tensors shaped, placed and typed like each parameter."""
    flat = stream_values(seed, offset, stream_length(params), distribution)
    out, start = [], 0
    for param in params:
        numel = param.numel()
        out.append(flat[start : start + numel].view(param.shape).to(device=param.device, dtype=param.dtype))
        start += numel
    return out


class SeedDirection:
    """Moves fixed parameters along one seed's direction at a time (a probe's perturbation and its reversal).

    Float32 CPU segments within one block keep the values drawn by :meth:`select` for every move;
    others redraw them at each move (:func:`perturb_`). Both give the same bits.
    """

    def __init__(self, params: Sequence[torch.Tensor], offset: int = 0, distribution: str = "gaussian") -> None:
        self.params = list(params)
        self.offset = offset
        self.distribution = check_distribution(distribution)
        self.seed = 0
        shapes = tuple(p.shape for p in self.params)
        self.blocks = stream_layout(shapes, offset)
        self.kept: list[torch.Tensor] | None = None
        if len(self.blocks) == 1 and all(p.dtype is torch.float32 and p.is_cpu for p in self.params):
            self.buffer = torch.empty(self.blocks[0].draw, dtype=torch.float32)
            self.kept = _piece_views(self.buffer, self.blocks[0], shapes)
            self.targets = piece_targets(self.params, self.blocks[0])

    def select(self, seed: int) -> None:
        """Make ``u(seed)`` the direction of the following moves."""
        self.seed = seed
        if self.kept is not None:
            _fill_(self.buffer, _THREAD.generator, seed, self.blocks[0].index, self.distribution)

    @torch.no_grad()
    def move(self, scale: float) -> None:
        """``θ += scale · u``."""
        if self.kept is None:
            perturb_(self.params, self.seed, scale, self.offset, self.distribution)
        else:
            torch._foreach_add_(self.targets, self.kept, alpha=scale)


@torch.no_grad()
def gradient_blocks(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    coefficients: Sequence[float],
    offset: int = 0,
    distribution: str = "gaussian",
) -> Iterator[tuple[Block, torch.Tensor, list[torch.Tensor]]]:
    """``ĝ = Σ_p c_p u(seed_p)`` one block at a time: yields each block, its covered values and a view per
    piece (float32 CPU, shaped like the parameter when whole), valid until the next block is drawn."""
    state = _THREAD
    generator = state.generator
    prepared = state.prepare(params, offset)
    gaussian = check_distribution(distribution) == "gaussian"
    reseed = generator.manual_seed
    for b, block in enumerate(prepared.blocks):
        grad, drawn, values = prepared.grad_regions[b], prepared.drawn[b], prepared.value_regions[b]
        grad.zero_()
        accumulate = grad.add_
        if gaussian:  # _fill_ spelled out: this loop is replay's whole per-seed overhead on small segments
            draw = drawn.normal_
            for seed, coefficient in zip(seeds, coefficients):
                reseed(block_seed(seed, block.index))
                draw(generator=generator)
                accumulate(values, alpha=coefficient)
        else:
            for seed, coefficient in zip(seeds, coefficients):
                _fill_(drawn, generator, seed, block.index, distribution)
                accumulate(values, alpha=coefficient)
        yield block, grad, prepared.grad_views[b]


def zo_gradients(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    coefficients: Sequence[float],
    offset: int = 0,
    distribution: str = "gaussian",
) -> list[torch.Tensor]:
    """``ĝ = Σ_p c_p u(seed_p)`` as new tensors shaped, placed and typed like each parameter (for analysis and tests)."""
    out = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    for block, _, views in gradient_blocks(params, seeds, coefficients, offset, distribution):
        for piece, view in zip(block.pieces, views):
            out[piece.position].view(-1)[piece.start : piece.stop] = view.reshape(-1)
    return [g.to(device=p.device, dtype=p.dtype) for g, p in zip(out, params)]


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A cheap, exact fingerprint of parameter values: SHA-256 over their bytes, shapes and dtypes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():  # hashed through the buffer protocol: no copy of the bytes
            # (numpy's stubs declare ndarray's buffer protocol for Python >= 3.12 only)
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()[:32]
