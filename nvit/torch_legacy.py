"""Whether a weight file in ``torch.save``'s legacy (non-zip) format is complete, checked without unpickling it.

The legacy format (``torch.save(obj, f, _use_new_zipfile_serialization=False)``, and every file saved before torch
1.6) is five pickles in a row (torch's magic number, the protocol version, the system info, the saved object, the
list of storage keys), then for each key in that list the storage's element count (8 bytes, little-endian) and its
raw bytes. The pickles are in the protocol ``torch.save`` was given (``pickle_protocol``, 2 by default; protocols 4
and 5 frame their opcodes), so the format is told by its first pickle's value, torch's magic number, not by fixed
bytes. ``torch.load`` reports a file cut short with whatever its unpickler meets at the cut: a cut inside a
global's name (``torch.FloatStorage``) reads as a global that ``weights_only=True`` does not allow, i.e. as an unsafe
pickle. Walking the structure here tells a cut file from an unsafe one. The same module is in ``shvit`` and ``nvit``
(the model packages may not import each other); ``vitzoo`` uses ``shvit``'s.
"""
import io
import os
import pickletools
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

__all__ = ['LEGACY_HEAD_SIZE', 'starts_as_legacy_file', 'legacy_file_cut']

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # the value of a legacy torch.save file's first pickle
# bytes enough for that first pickle in any pickle protocol (14 at protocol 2, 24 at protocol 4, 27 at protocol 1)
LEGACY_HEAD_SIZE = 64
_PARTS = ('magic number', 'protocol version', 'system info', 'pickled object', 'list of storage keys')
# bytes per element of the storage types a legacy file names (torch.<Name>Storage); UntypedStorage counts bytes
_ELEMENT_SIZES = {
    'DoubleStorage': 8, 'FloatStorage': 4, 'HalfStorage': 2, 'BFloat16Storage': 2, 'LongStorage': 8,
    'IntStorage': 4, 'ShortStorage': 2, 'CharStorage': 1, 'ByteStorage': 1, 'BoolStorage': 1,
    'ComplexDoubleStorage': 16, 'ComplexFloatStorage': 8, 'QInt8Storage': 1, 'QInt32Storage': 4,
    'QUInt8Storage': 1, 'QUInt4x2Storage': 1, 'QUInt2x4Storage': 1, 'UntypedStorage': 1,
}
# opcodes whose argument is the value they push (strings and integers)
_VALUE_OPS = {'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'UNICODE', 'STRING', 'BINSTRING', 'SHORT_BINSTRING',
              'BININT', 'BININT1', 'BININT2', 'INT', 'LONG', 'LONG1', 'LONG4'}
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # a value this walk does not build


class _Global(str):
    """A global a pickle names (``"module name"``), not imported."""


def _pop(stack: List[Any], count: int) -> List[Any]:
    if len(stack) < count:
        raise ValueError('pickle pops more than it pushed')
    popped = stack[len(stack) - count:]
    del stack[len(stack) - count:]
    return popped


def _walk(f: BinaryIO) -> Tuple[Any, List[Any]]:
    """Step through one pickle up to its STOP without running it (``pickletools.genops`` parses the opcodes; a
    simulated stack keeps the strings, integers, None, globals, tuples and lists they build). Returns the pickle's
    value (or a placeholder) and its persistent ids; raises ValueError where the stream ends early or is no pickle."""
    stack: List[Any] = []
    memo: Dict[int, Any] = {}
    pids: List[Any] = []
    for op, arg, _ in pickletools.genops(f):
        name, before = op.name, op.stack_before
        if name in ('BINPUT', 'LONG_BINPUT', 'PUT', 'MEMOIZE'):
            if not stack:
                raise ValueError('pickle memoizes an empty stack')
            memo[len(memo) if name == 'MEMOIZE' else arg] = stack[-1]
            continue
        items: List[Any] = []
        if pickletools.markobject in before:  # the items down to the last MARK, then what lies below it
            if _MARK not in stack:
                raise ValueError('pickle has no MARK to pop to')
            at = len(stack) - 1 - stack[::-1].index(_MARK)
            items = stack[at + 1:]
            del stack[at:]
            popped = _pop(stack, before.index(pickletools.markobject))
        else:
            popped = _pop(stack, len(before))
        if name == 'STOP':
            return popped[0], pids
        if name == 'MARK':
            pushed = [_MARK]
        elif name in _VALUE_OPS:
            pushed = [arg]
        elif name == 'NONE':
            pushed = [None]
        elif name in ('BINGET', 'LONG_BINGET', 'GET'):
            pushed = [memo.get(arg, _UNKNOWN)]
        elif name == 'GLOBAL':
            pushed = [_Global(arg)]
        elif name == 'STACK_GLOBAL':
            pushed = [_Global(f'{popped[0]} {popped[1]}')]
        elif name in ('TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3', 'EMPTY_TUPLE'):
            pushed = [tuple(items or popped)]
        elif name in ('EMPTY_LIST', 'LIST'):
            pushed = [list(items)]
        elif name in ('APPEND', 'APPENDS'):
            if isinstance(popped[0], list):
                popped[0].extend(items or popped[1:])
            pushed = [popped[0]]
        elif name in ('BINPERSID', 'PERSID'):
            pids.append(popped[0] if name == 'BINPERSID' else arg)
            pushed = [_UNKNOWN]
        elif name == 'DUP':
            pushed = popped * 2
        else:
            pushed = [_UNKNOWN] * len(op.stack_after)
        stack.extend(pushed)
    raise ValueError('pickle exhausted before seeing STOP')  # genops raises this itself; kept for the type checker


def _element_size(storage_type: Any) -> Optional[int]:
    module, _, name = str(storage_type).partition(' ')
    return _ELEMENT_SIZES.get(name) if isinstance(storage_type, _Global) and module == 'torch' else None


def starts_as_legacy_file(head: bytes) -> bool:
    """True if ``head`` (a file's first bytes, ``LEGACY_HEAD_SIZE`` of them or fewer) starts with a pickle, in any
    protocol, whose only value is torch's magic number, as every legacy ``torch.save`` file does (a file that ends
    right after the number, before the pickle's STOP, included). Parses the opcodes; nothing is unpickled."""
    values = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name == 'STOP':
                break
            if op.name not in ('PROTO', 'FRAME'):
                values.append(arg)
    except Exception:  # noqa: BLE001  bytes that end early or are no pickle: genops raises whatever it meets
        pass
    return values == [_MAGIC_NUMBER]


def legacy_file_cut(path: Union[str, os.PathLike]) -> Optional[str]:
    """Where a legacy-format ``torch.save`` file ends too early, in words (``"it is a legacy (non-zip) torch.save
    file that ends at byte 782, inside its pickled object"``); None when it is complete, is not in the legacy format,
    or is damaged in a way this walk cannot tell from a valid file (``torch.load`` then reports it). Reads the
    pickles and the storages' element counts, and seeks past the storages' bytes; nothing is unpickled."""
    with open(path, 'rb') as f:
        if not starts_as_legacy_file(f.read(LEGACY_HEAD_SIZE)):
            return None
        size = os.fstat(f.fileno()).st_size
        cut = f'it is a legacy (non-zip) torch.save file that ends at byte {size}'
        f.seek(0)
        values = []
        for part in _PARTS:
            try:
                values.append(_walk(f))
            except ValueError:
                return f'{cut}, inside its {part}' if f.tell() >= size else None
        element_sizes: Dict[Any, Optional[int]] = {}
        for pid in values[3][1]:  # ('storage', torch.<Name>Storage, key, location, numel, view)
            if isinstance(pid, tuple) and len(pid) > 2 and pid[0] == 'storage':
                element_sizes.setdefault(pid[2], _element_size(pid[1]))
        keys = values[4][0]
        if not isinstance(keys, list):
            return None
        for number, key in enumerate(keys, 1):
            count = f.read(8)
            element_size = element_sizes.get(key)
            numel = int.from_bytes(count, 'little', signed=True)
            if len(count) == 8 and (element_size is None or numel < 0):
                return None  # not a storage this walk can size: torch.load reads it
            end = f.tell() + numel * (element_size or 0)
            if len(count) < 8 or end > size:
                return f'{cut}, inside the data of storage {number} of {len(keys)}'
            f.seek(end)
    return None
