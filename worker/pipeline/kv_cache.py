"""A KV cache preallocated for `slots x max_len` positions, written at per-row positions.

transformers' attention modules call `cache.update(k, v, layer_idx)` and attend over what it
returns; the lean forwards (lean_llama.py, lean_neox.py) call `write` and `read`, the same two halves
without the layout change.
Before each forward the backend *binds* the cache to the rows it runs (decode: the first n slots, so reads
are views, not gathers; a batched prefill: any slots, gathered), the position each new token is written at,
and how many positions attention reads (a bucketed length, so shapes repeat and graphs can be reused).

Position `max_len` is a scratch column: padding tokens and idle rows write there, and no mask
ever lets attention read it.

Rows past the first `slots` are spare: no forward binds them; they only hold cached prefixes that
`copy` moves in and out of decode rows (worker/engine/prefix_cache.py plans the moves).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """A transformers-compatible KV cache in `dtype` on `device`: per layer, k and v of (slots + spare,
    kv_heads, max_len + 1, head_dim) once allocate()d, the last column the scratch one."""

    def __init__(self, num_layers: int, slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 spare: int = 0):
        self.num_layers = num_layers
        self.slots = slots
        self.spare = spare
        self.max_len = max_len
        self.scratch = max_len  # write-only column for padding and idle rows
        self.dtype = dtype
        self.device = device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._rows: int | torch.Tensor = 0
        self._row_idx = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._pos = torch.zeros(0, 0, dtype=torch.long, device=device)
        self._kv_len = 0
        self._flat = torch.zeros(0, dtype=torch.long, device=device)
        self.kv_heads = self.head_dim = 0

    def allocate(self, kv_heads: int, head_dim: int) -> None:
        """Preallocate every layer's buffers once (static addresses, as CUDA graphs need)."""
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (self.slots + self.spare, kv_heads, self.max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    @property
    def allocated(self) -> bool:
        """Whether the buffers exist (allocate() ran, and they were not cleared since)."""
        return bool(self.k)

    def bind(self, rows: int | torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """Set where the next forward writes: `rows` are slots (an int n: the first n slots; or a 1-d
        tensor of slot indices), `positions` is (rows, tokens), `kv_len` how many positions attention
        reads. (An int, not a slice: torch.compile keeps an int symbolic, one compile for every n.)"""
        idx = rows.to(self.device) if isinstance(rows, torch.Tensor) else torch.arange(rows, device=self.device)
        self._rows = rows
        self._row_idx = idx.unsqueeze(1)
        self._pos = positions
        self._kv_len = kv_len
        # Where each (row, token, kv head) lands in a layer's buffer seen as (rows x kv_heads x (max_len + 1),
        # head_dim): one index_copy_ per write instead of advanced indexing (which builds and broadcasts its
        # index tensors on every call, for each of 2 x layers writes per step).
        heads = torch.arange(self.kv_heads, device=self.device)
        self._flat = (((self._row_idx * self.kv_heads).unsqueeze(-1) + heads) * (self.max_len + 1)
                      + positions.unsqueeze(-1)).reshape(-1)

    @property
    def first_rows(self) -> int | None:
        """n when bound to the first n slots (decode), else None (a tensor of slots)."""
        return None if isinstance(self._rows, torch.Tensor) else self._rows

    def write_positions(self) -> torch.Tensor:
        """The bound write positions, (rows, tokens) int64."""
        return self._pos

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's whole k and v buffers, each (slots + spare, kv_heads, max_len + 1, head_dim), for kernels that
        write and read them in place (cpu_decode_layer.py)."""
        return self.k[layer_idx], self.v[layer_idx]

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write a layer's new keys and values, each (rows x tokens x kv_heads, head_dim) in that order (row-major
        (rows, tokens, kv_heads, head_dim), as a projection's output is laid out) and in the cache's dtype, at the
        bound rows and positions."""
        self.k[layer_idx].view(-1, self.head_dim).index_copy_(0, self._flat, key)
        self.v[layer_idx].view(-1, self.head_dim).index_copy_(0, self._flat, value)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write a layer's new keys and values, (rows, kv_heads, tokens, head_dim), at the bound rows and
        positions. Returns that layer's keys and values for the bound rows, (rows, kv_heads, kv_len, head_dim)."""
        # key/value: (rows, kv_heads, tokens, head_dim), already rotated.
        self.write(layer_idx, key.transpose(1, 2).reshape(-1, self.head_dim).to(self.dtype),
                   value.transpose(1, 2).reshape(-1, self.head_dim).to(self.dtype))
        return self.read(layer_idx)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values for the bound rows, each (rows, kv_heads, kv_len, head_dim): views for the
        first n slots, gathered copies for a tensor of slots."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        if not isinstance(self._rows, torch.Tensor):
            return k[: self._rows, :, : self._kv_len], v[: self._rows, :, : self._kv_len]
        idx = self._row_idx.view(-1)
        return k[:, :, : self._kv_len].index_select(0, idx), v[:, :, : self._kv_len].index_select(0, idx)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of row `src` to row `dst` in every layer, in place (the buffers keep
        their addresses, as captured graphs need). ValueError for rows or a length out of range."""
        rows = self.slots + self.spare
        if not (0 <= src < rows and 0 <= dst < rows) or src == dst or not 0 < length <= self.max_len:
            raise ValueError(f"copy: rows {src}->{dst} of {rows}, length {length} of {self.max_len}")
        for t in (*self.k, *self.v):
            t[dst, :, :length].copy_(t[src, :, :length])

    # transformers asks these of any cache object in a few code paths.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The bound kv_len (positions attention reads), not a count of tokens written."""
        return self._kv_len

    def __len__(self) -> int:
        return self.num_layers
