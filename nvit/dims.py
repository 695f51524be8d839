"""The NViT dims record: the one description of an NViT architecture.

An NViT is a ViT whose blocks each have their own widths. ``NViTDims`` holds the embedding width (shared by every
block: it is the residual stream) plus, per block, the head count, the q/k width per head, the v width per head and
the MLP hidden width. Per-head widths follow the official ``'dim'`` record stored in the released checkpoints
(``{'EMB', 'head', 'QK', 'V', 'MLP'}``), so the total q/k width of block ``i`` is ``heads[i] * qk_dim[i]``.
"""
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ['NViTDims', 'DimsLike', 'revit_dims', 'resolve_dims']

# our key -> official key (the ``'dim'`` record of the released checkpoints)
_OFFICIAL_KEYS = {'embed_dim': 'EMB', 'heads': 'head', 'qk_dim': 'QK', 'v_dim': 'V', 'mlp_dim': 'MLP'}
_LIST_FIELDS = ('heads', 'qk_dim', 'v_dim', 'mlp_dim')


def _as_int(name: str, value: Any) -> int:
    # bool is an int subclass; a width of True is a bug, not a 1
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, 'item') and not isinstance(value, bool):  # numpy / torch scalars from checkpoints
            return _as_int(name, value.item())
        raise TypeError(f'NViT dims: {name} must be an int, got {type(value).__name__} ({value!r}).')
    if value < 1:
        raise ValueError(f'NViT dims: {name} must be >= 1, got {value}.')
    return value


@dataclass(frozen=True)
class NViTDims:
    """Widths of an NViT: shared embedding width plus per-block lists.

    Args:
        embed_dim: Embedding (residual stream) width, shared by all blocks.
        heads: Attention heads per block.
        qk_dim: Query/key width per head, per block.
        v_dim: Value width per head, per block.
        mlp_dim: MLP hidden width per block.
    """
    embed_dim: int
    heads: Tuple[int, ...]
    qk_dim: Tuple[int, ...]
    v_dim: Tuple[int, ...]
    mlp_dim: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, 'embed_dim', _as_int('embed_dim', self.embed_dim))
        lengths = {}
        for name in _LIST_FIELDS:
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise TypeError(f'NViT dims: {name} must be a list of ints (one per block), got {values!r}.')
            object.__setattr__(self, name, tuple(_as_int(f'{name}[{i}]', v) for i, v in enumerate(values)))
            lengths[name] = len(values)
        if len(set(lengths.values())) != 1:
            raise ValueError(f'NViT dims: per-block lists must all have one entry per block, got lengths {lengths}.')
        if not lengths['heads']:
            raise ValueError('NViT dims: at least one block is needed (per-block lists are empty).')

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.heads)

    def first_blocks(self, n: int) -> 'NViTDims':
        """The dims of the first ``n`` blocks (a model pruned to them)."""
        return NViTDims(self.embed_dim, *(getattr(self, name)[:n] for name in _LIST_FIELDS))

    def block(self, i: int) -> Dict[str, int]:
        """Widths of block ``i`` as a dict (heads, qk_dim, v_dim, mlp_dim)."""
        return {name: getattr(self, name)[i] for name in _LIST_FIELDS}

    def first_difference(self, other: 'NViTDims') -> Optional[str]:
        """Where ``self`` and ``other`` first differ, in words (``'block 3: mlp_dim 320 vs 352'``), or None."""
        if self.embed_dim != other.embed_dim:
            return f'embed_dim {self.embed_dim} vs {other.embed_dim}'
        if self.depth != other.depth:
            return f'depth {self.depth} vs {other.depth} blocks'
        for i in range(self.depth):
            for name in _LIST_FIELDS:
                a, b = getattr(self, name)[i], getattr(other, name)[i]
                if a != b:
                    return f'block {i}: {name} {a} vs {b}'
        return None

    @classmethod
    def uniform(cls, embed_dim: int, depth: int, heads: int, head_dim: int, mlp_dim: int) -> 'NViTDims':
        """Same widths in every block (a plain ViT / DeiT)."""
        return cls(embed_dim, (heads,) * depth, (head_dim,) * depth, (head_dim,) * depth, (mlp_dim,) * depth)

    def to_dict(self, official: bool = False) -> Dict[str, Any]:
        """JSON-serialisable dict; ``official=True`` uses the checkpoint keys EMB/head/QK/V/MLP."""
        out = {'embed_dim': self.embed_dim, **{name: list(getattr(self, name)) for name in _LIST_FIELDS}}
        if official:
            out = {_OFFICIAL_KEYS[k]: v for k, v in out.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'NViTDims':
        """Build from a dict with our keys or the official ones (EMB, head, QK, V, MLP), not a mix."""
        if not isinstance(d, Mapping):
            raise TypeError(f'NViT dims: expected a dict, got {type(d).__name__}.')
        ours, official = set(_OFFICIAL_KEYS), set(_OFFICIAL_KEYS.values())
        keys = set(d)
        if keys == ours:
            return cls(**{k: d[k] for k in ours})
        if keys == official:
            return cls(**{k: d[v] for k, v in _OFFICIAL_KEYS.items()})
        raise ValueError(
            f'NViT dims: dict keys {sorted(keys)} are neither {sorted(ours)} nor the official {sorted(official)}.')

    def to_json(self) -> str:
        """Compact JSON string (our keys)."""
        return json.dumps(self.to_dict(), separators=(',', ':'))

    @classmethod
    def from_json(cls, text: str) -> 'NViTDims':
        """Parse a JSON string written by ``to_json`` (or holding the official keys)."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f'NViT dims: not valid JSON ({e}): {str(text)[:80]!r}') from e
        return cls.from_dict(d)

    def __str__(self) -> str:
        rows = [f'NViTDims(embed_dim={self.embed_dim}, depth={self.depth})',
                f'{"block":>5} {"heads":>5} {"qk/head":>7} {"v/head":>6} {"mlp":>6}']
        for i in range(self.depth):
            rows.append(f'{i:>5} {self.heads[i]:>5} {self.qk_dim[i]:>7} {self.v_dim[i]:>6} {self.mlp_dim[i]:>6}')
        return '\n'.join(rows)


DimsLike = Union[NViTDims, Mapping[str, Any], str]


def resolve_dims(dims: Optional[DimsLike]) -> Optional[NViTDims]:
    """Accept an ``NViTDims``, a dict (either key style) or a JSON string; ``None`` passes through."""
    if dims is None or isinstance(dims, NViTDims):
        return dims
    if isinstance(dims, str):
        return NViTDims.from_json(dims)
    if isinstance(dims, Mapping):
        return NViTDims.from_dict(dims)
    raise TypeError(f'dims must be an NViTDims, a dict or a JSON string, got {type(dims).__name__}.')


def revit_dims(embed_dim: int) -> NViTDims:
    """ReViT dims from the redistribution rule, as the official code computes it (``revit_scratch.py``).

    Blocks 4-9 get twice the heads, q/k width and MLP ratio of blocks 2-3 and 10-11; blocks 1 and 12 use 10 heads
    and the wide q/k width (the code's deviation from the paper's Table 6). V is 64 per head everywhere. Python's
    ``round`` (round-half-even) is used, as in the code.

    Args:
        embed_dim: Embedding width (176 for ReViT-T, 384 for ReViT-S).
    """
    embed_dim = _as_int('embed_dim', embed_dim)
    head_unit = round(embed_dim * 0.005)
    qk_unit = round(embed_dim * 0.05 / 8)
    if head_unit < 1 or qk_unit < 1:
        raise ValueError(f'revit_dims: embed_dim={embed_dim} is too small for the ReViT rule (it gives zero heads '
                         f'or zero q/k width); use embed_dim >= 101.')
    narrow = (head_unit * 2, qk_unit * 8, embed_dim * 3)
    wide = (head_unit * 4, qk_unit * 16, embed_dim * 6)
    ends = (10, qk_unit * 16, embed_dim * 3)
    layout: List[Tuple[int, int, int]] = [ends] + [narrow] * 2 + [wide] * 6 + [narrow] * 2 + [ends]
    return NViTDims(
        embed_dim=embed_dim,
        heads=[b[0] for b in layout],
        qk_dim=[b[1] for b in layout],
        v_dim=[64] * len(layout),
        mlp_dim=[b[2] for b in layout],
    )
