"""Core attention with the kernel the platform offers.

A drop-in ``core_attention`` module for megatron-core layer specs (same
constructor and forward signature as ``DotProductAttention``).  It replaces
the guide's hand-copied MindSpeed ``dot_product_attention.py``:

* ``sdpa``  torch ``scaled_dot_product_attention`` (CPU, CUDA; the default),
* ``flash`` flash-attn's varlen kernel (CUDA, half precision, when installed),
* ``npu``   ``torch_npu.npu_fusion_attention`` (Ascend).

Variable-length attention: when ``packed_seq_params`` carries ``cu_seqlens_q``
the tokens of one row form several independent sequences (the patches of
several images in the ViT) which never attend to each other.
"""
import importlib
import os
import weakref

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from mindspeed_mm.platform import current_platform

BACKENDS = ("sdpa", "flash", "npu")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def select_backend(device_type: str, requested: str = None) -> str:
    """The attention kernel for this device; MM_ATTENTION_BACKEND overrides."""
    requested = requested or os.environ.get("MM_ATTENTION_BACKEND")
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention backend '{requested}': choose one of {', '.join(BACKENDS)}")
        return requested
    if device_type == "npu":
        return "npu"
    if device_type == "cuda" and _importable("flash_attn"):
        return "flash"
    return "sdpa"


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] id of the packed sequence each token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    if ids.numel() < total:  # trailing padding forms its own segment
        ids = torch.cat([ids, ids.new_full((total - ids.numel(),), len(lengths))])
    return ids


def allowed_mask(sq, sk, device, causal, attention_mask=None, cu_q=None, cu_k=None):
    """Boolean [b|1, 1, sq, sk] mask, True where a query may attend a key.

    ``attention_mask`` follows megatron's convention (True = masked out).  The
    causal diagonal is aligned bottom-right, so a decode step (sq < sk) sees
    the whole cache.
    """
    allowed = None
    if causal:
        q_pos = torch.arange(sk - sq, sk, device=device)
        allowed = (q_pos[:, None] >= torch.arange(sk, device=device)[None, :])[None, None]
    if cu_q is not None:
        seg = segment_ids(cu_q, sq)[:, None] == segment_ids(cu_k, sk)[None, :]
        allowed = seg[None, None] if allowed is None else allowed & seg
    if attention_mask is not None:
        keep = ~attention_mask.bool()
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None:
        # A fully masked row (left padding) would give NaN; let it see itself.
        # Done unconditionally: testing for such rows first would cost a host sync.
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (empty & torch.eye(sq, sk, dtype=torch.bool, device=device).roll(sk - sq, 1))
    return allowed


class _MaskCache:
    """The mask of the last forward, reused by every layer that gets the same inputs.

    Keyed on the identity of the mask / cu_seqlens tensors (weak references,
    so a freed tensor can never be mistaken for a new one at the same address).
    """

    def __init__(self):
        self.refs, self.key, self.mask = (), None, None

    def get(self, sq, sk, device, causal, attention_mask, cu_q, cu_k):
        tensors = (attention_mask, cu_q, cu_k)
        key = (sq, sk, str(device), causal)
        if key == self.key and len(self.refs) == 3 and all(
                (r is None and t is None) or (r is not None and r() is t) for r, t in zip(self.refs, tensors)):
            return self.mask
        self.mask = allowed_mask(sq, sk, device, causal, attention_mask, cu_q, cu_k)
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.key = key
        return self.mask


_MASKS = _MaskCache()


class _SegmentCache:
    """Runs of equal-length segments of the last two cu_seqlens seen (one host sync per forward and
    boundary set, not per layer; two: Qwen2.5-VL's ViT alternates per-window and per-frame boundaries)."""

    def __init__(self):
        self.entries = []  # [(weakref to cu, total, runs)], most recent last

    def get(self, cu: torch.Tensor, total: int):
        for ref, seen_total, runs in self.entries:
            if ref() is cu and seen_total == total:
                return runs
        bounds = cu.tolist()
        if bounds[-1] < total:  # trailing padding forms its own segment, as in segment_ids
            bounds.append(total)
        runs = []  # [(segments, length)]: consecutive segments of one length, e.g. the frames of a clip
        for start, end in zip(bounds[:-1], bounds[1:]):
            n = end - start
            if n <= 0:
                continue
            if runs and runs[-1][1] == n:
                runs[-1][0] += 1
            else:
                runs.append([1, n])
        runs = [tuple(r) for r in runs]
        self.entries = self.entries[-1:] + [(weakref.ref(cu), total, runs)]
        return runs


_SEGMENTS = _SegmentCache()


class CoreAttention(MegatronModule):
    """softmax(QK^T * scale + mask) V for [s, b, heads, dim] inputs."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 backend=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.backend = select_backend(current_platform().device_type, backend)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        thd = query.dim() == 3  # megatron squeezes the batch dim for qkv_format='thd'
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cu_q = cu_k = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu_q, cu_k = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        dropout = self.dropout_p if self.training else 0.0

        if self.backend == "flash" and query.dtype in (torch.float16, torch.bfloat16) and attention_mask is None:
            out = self._flash(query, key, value, causal, cu_q, cu_k, dropout)
        elif self.backend == "npu" and attention_mask is None:
            out = self._npu(query, key, value, causal, cu_q, cu_k, dropout)
        else:
            out = self._sdpa(query, key, value, causal, attention_mask, cu_q, cu_k, dropout)
        # out: [s, b, heads, dim] -> [s, b, heads * dim] (or [t, heads * dim] for thd)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out.squeeze(1) if thd else out

    def _sdpa(self, q, k, v, causal, attention_mask, cu_q, cu_k, dropout):
        sq, sk = q.shape[0], k.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, dim]
        gqa = q.shape[1] != k.shape[1]
        if cu_q is not None and attention_mask is None and q.shape[0] == 1 and (cu_k is cu_q or torch.equal(cu_k, cu_q)):
            return self._sdpa_segments(q, k, v, causal, cu_q, dropout, gqa)
        if causal and attention_mask is None and cu_q is None and sq == sk:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            mask = _MASKS.get(sq, sk, q.device, causal, attention_mask, cu_q, cu_k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)

    def _sdpa_segments(self, q, k, v, causal, cu, dropout, gqa):
        """Packed sequences (samples of a pack, patches of several images): attention within each.

        Cost sum(n_i^2) instead of a dense (sum n_i)^2 mask; q, k, v are [1, heads, s, dim].  The row is
        split into runs of consecutive equal-length segments, each run one batched SDPA call, and the
        outputs concatenated: split / view / cat only, whose backward is one concatenation (an index
        gather's backward would be a scatter-add, slow on the CPU: 2x the attention time).
        """
        runs = _SEGMENTS.get(cu, q.shape[2])
        sizes = [m * n for m, n in runs]
        outs = []
        for (m, n), qs, ks, vs in zip(runs, q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)):
            # [1, heads, m*n, dim] -> [m, heads, n, dim]
            qs, ks, vs = (x.unflatten(2, (m, n))[0].transpose(0, 1) for x in (qs, ks, vs))
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=causal,
                                               scale=self.softmax_scale, enable_gqa=gqa)
            outs.append(o.transpose(0, 1).flatten(1, 2)[None])
        return torch.cat(outs, 2).permute(2, 0, 1, 3)

    def _flash(self, q, k, v, causal, cu_q, cu_k, dropout):
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if cu_q is not None:  # packed: one row of several sequences
            max_q = int((cu_q[1:] - cu_q[:-1]).max())
            max_k = int((cu_k[1:] - cu_k[:-1]).max())
            out = flash_attn_varlen_func(q[:, 0], k[:, 0], v[:, 0], cu_q.int(), cu_k.int(), max_q, max_k,
                                         dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal)
            return out.unsqueeze(1)
        out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), dropout_p=dropout,
                              softmax_scale=self.softmax_scale, causal=causal)
        return out.transpose(0, 1)

    def _npu(self, q, k, v, causal, cu_q, cu_k, dropout):
        import torch_npu

        heads = q.shape[2]
        mask = None
        sparse_mode = 0
        if causal:  # the kernel's compressed causal mask (sparse_mode 3 needs a 2048x2048 triu)
            mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=q.device), diagonal=1)
            sparse_mode = 3
        if cu_q is not None:
            out = torch_npu.npu_fusion_attention(
                q[:, 0], k[:, 0], v[:, 0], heads, "TND", atten_mask=mask, scale=self.softmax_scale,
                keep_prob=1.0 - dropout, sparse_mode=sparse_mode,
                actual_seq_qlen=cu_q[1:].tolist(), actual_seq_kvlen=cu_k[1:].tolist())[0]
            return out.unsqueeze(1)
        out = torch_npu.npu_fusion_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), heads, "BNSD",
            atten_mask=mask, scale=self.softmax_scale, keep_prob=1.0 - dropout, sparse_mode=sparse_mode)[0]
        return out.permute(2, 0, 1, 3)
