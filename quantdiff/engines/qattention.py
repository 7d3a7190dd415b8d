"""The attention processor of a real 8-bit UNet: diffusers' attention with ModelOpt's static q/k/v
(and softmax) quantizers frozen, the FP8 Triton attention kernel where it runs, one GEMM for the
projections that the conversion fused (to_qkv, to_kv), and one quantized input for the q/k/v
projections that share an input quantizer but were not fused."""
import torch
import torch.nn.functional as F

from quantdiff.engines.gemm8 import FP8, resolve_fp8_attention
from quantdiff.engines.qlinear import FP8Linear


def _feeds(projection):
    """True for an fp8 linear set up to write its output onto a quantizer's grid (FP8Linear.feeds)."""
    return getattr(projection, "e4m3_out_scale", None) is not None


def reads_e4m3_attention_output(projection):
    """True for an output projection that takes the fp8 kernel's output on its own input grid (an fp8
    linear without smoothing): no fp16 write between them, no quantize kernel."""
    return isinstance(projection, FP8Linear) and projection.act.pre_quant_scale is None


def fp8_kernel_scales(attn):
    """The fp8 attention kernel's scales for `attn` (triton_attention.kernel_scales): q, k, v and, where
    the output projection reads e4m3, its grid. Conversion keeps them as the buffer attn.fp8_kernel_scales."""
    from quantdiff.engines.triton_attention import kernel_scales

    projection = attn.to_out[0]
    out_grid = projection.act.to_grid if reads_e4m3_attention_output(projection) else None
    return kernel_scales(attn.q_quant.back, attn.k_quant.back, attn.v_quant.back, out_grid)


def _query_width(attn):
    """The width of q: the first split of a fused to_qkv (q, k and v share it in diffusers' Attention)."""
    return attn.to_qkv.split_sizes[0] if hasattr(attn, "to_qkv") else attn.to_q.out_features


class QuantAttnProcessor:
    """diffusers attention processor with static q/k/v (and softmax) quantize-dequantize.

    ModelOpt's Attention plugin swaps F.scaled_dot_product_attention for a version that quantizes
    q, k, v and runs plain SDPA: with the default AttnProcessor2_0 the softmax output is never
    quantized. Only the bmm path (classic AttnProcessor) passes the softmax through its quantizer;
    `quantize_softmax` reproduces that. The quantizers live on the Attention module as q_quant,
    k_quant, v_quant and softmax_quant so that .to() and state_dict carry them (`quantize_qkv`
    False: there are none, and the attention is diffusers' AttnProcessor2_0).

    `shared_inputs`: groups of the 8-bit q/k/v projections whose input quantizers are the same
    (StaticQuant.same_grid); those reading one tensor in a call (k and v always, q too in
    self-attention) quantize it once and each reads that 8-bit tensor: with fp8 every projection of
    a self-attention is calibrated on the same normalized input, and the kernel before them would
    otherwise write the same 8-bit tensor three times. Where the conversion fused those projections
    into one linear (attn.to_qkv of a self-attention, attn.to_kv: qmodules._fuse_projections), one
    GEMM computes them side by side and q, k and v are views of its output; at level 4 with one
    q/k/v grid that output is quantized in one go. For the fp8 attention kernel, the projections
    that feed their quantizer (FP8Linear.feeds, set at conversion) write e4m3 q/k/v from the GEMM
    itself: no fp16 q/k/v, no quantize kernels (`e4m3_projections`).
    """

    def __init__(self, quantize_softmax=False, fp8_attention="sdpa", quantize_qkv=True, shared_inputs=(),
                 one_qkv_grid=False):
        self.quantize_softmax = quantize_softmax
        self.fp8_attention = fp8_attention  # gemm8.resolve_fp8_attention; set_fp8_attention sets a whole model
        self.quantize_qkv = quantize_qkv
        self.shared_inputs = shared_inputs
        # q_quant, k_quant and v_quant are one grid (StaticQuant.same_grid), decided at conversion:
        # comparing buffers in forward would be a data-dependent branch, which export refuses
        self.one_qkv_grid = one_qkv_grid
        # with the fp8 kernel, the projections that can (qmodules._feed_quantizers_from_gemms) write
        # e4m3 q/k/v from their GEMMs; False: fp16 outputs and quantize kernels (set_e4m3_projections)
        self.e4m3_projections = True

    def runs_fp8_kernel(self, attn, head_dim, device, attention_mask):
        """True where the Triton fp8 attention takes this call: fp8 q/k/v quantizers without a
        pre-quant scale, no mask, no softmax quantizer, a head_dim it handles, on the GPU (where the
        setting resolves to it)."""
        from quantdiff.engines import triton_attention

        if not self.quantize_qkv:
            return False
        quants = (attn.q_quant, attn.k_quant, attn.v_quant)
        return (not self.quantize_softmax and attention_mask is None
                and all(q.fmt == "fp8" and q.pre_quant_scale is None for q in quants)
                and triton_attention.supports(head_dim)
                and resolve_fp8_attention(self.fp8_attention, device) != "sdpa")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_layout = hidden_states.ndim == 4
        if image_layout:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        if self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        dtype = hidden_states.dtype  # of the output (q, k and v may come in e4m3)
        head_dim = _query_width(attn) // attn.heads
        fp8_kernel = self.runs_fp8_kernel(attn, head_dim, hidden_states.device, attention_mask)
        # for the fp8 kernel, the projections set up for it write e4m3 q/k/v on their quantizers' grids
        query, key, value, qkv = self._projections(attn, hidden_states, encoder_hidden_states, self_attention,
                                                   e4m3=fp8_kernel and self.e4m3_projections)

        def split_heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        image_shape = (channels, height, width) if image_layout else None
        if fp8_kernel:
            from quantdiff.engines.triton_attention import fp8_attention_scaled

            quants = (attn.q_quant, attn.k_quant, attn.v_quant)
            # made at conversion; computed here (a small kernel per call) for a processor set by hand.
            # Four scales: the output projection reads the kernel's e4m3 output (reads_e4m3_attention_output)
            scales = attn.fp8_kernel_scales if hasattr(attn, "fp8_kernel_scales") else fp8_kernel_scales(attn)
            projection, fused = attn.to_out[0], scales.shape[0] == 4
            # a fused fp16 q/k/v output on one grid (calibration's fused_scales) takes one quantize; an e4m3
            # one (the GEMM wrote it on its quantizers' grids, FP8Linear.feeds) needs none
            wrote_e4m3 = qkv is not None and qkv.dtype == FP8
            if qkv is not None and not wrote_e4m3 and self.one_qkv_grid and attn.norm_q is None \
                    and attn.norm_k is None:
                quantized = [split_heads(t) for t in quants[0].quantize(qkv).split(attn.to_qkv.split_sizes, -1)]
            else:  # e4m3 already where the GEMM wrote it so
                quantized = [t if t.dtype == FP8 else q.quantize(t) for q, t in zip(quants, (query, key, value))]
            hidden_states = fp8_attention_scaled(*quantized, scales,  # SDPA's default softmax scale, as below
                                                 quantize_probs=self.fp8_attention == "triton-fp8-probs")
            if fused:
                merged = hidden_states.transpose(1, 2).reshape(-1, attn.heads * head_dim)  # a view: heads-last
                projected = projection.from_quantized(merged, dtype).reshape(batch, -1, projection.out_features)
                return self._finish(attn, projected, image_layout, residual, image_shape)
        else:
            if self.quantize_qkv:
                query, key, value = attn.q_quant(query), attn.k_quant(key), attn.v_quant(value)
            if self.quantize_softmax:
                scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
                if attention_mask is not None:
                    scores = scores + attention_mask
                probs = attn.softmax_quant(scores.softmax(dim=-1).to(query.dtype))
                hidden_states = torch.matmul(probs, value)
            else:
                hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return self._finish(attn, attn.to_out[0](hidden_states.to(dtype)), image_layout, residual, image_shape)

    def _projections(self, attn, hidden_states, context, self_attention, e4m3=False):
        """to_q(hidden_states), to_k(context), to_v(context), and the fused output they are views of
        where one GEMM made all three (attn.to_qkv, else None). Fused at conversion (qmodules:
        to_qkv in a self-attention, to_kv), they are one GEMM's output split; otherwise each group
        of shared_inputs that reads one tensor in this call quantizes it once. With `e4m3`, the
        projections that feed their q/k/v quantizer from the GEMM (FP8Linear.feeds) return e4m3."""
        def project(projection, x):
            return projection.e4m3_output(x) if e4m3 and _feeds(projection) else projection(x)

        if hasattr(attn, "to_qkv"):
            if not self_attention:
                raise ValueError("this attention's q/k/v projections were fused into one GEMM for self-attention; "
                                 "it cannot take encoder_hidden_states")
            qkv = project(attn.to_qkv, hidden_states)
            return (*qkv.split(attn.to_qkv.split_sizes, -1), qkv)
        if hasattr(attn, "to_kv"):
            key, value = project(attn.to_kv, context).split(attn.to_kv.split_sizes, -1)
            return project(attn.to_q, hidden_states), key, value, None
        names, inputs = ("to_q", "to_k", "to_v"), (hidden_states, context, context)
        outputs = [None] * 3
        for group in self.shared_inputs:
            members = [i for i, name in enumerate(names) if name in group and (i > 0 or self_attention)]
            if len(members) < 2:
                continue
            x = inputs[members[0]]
            xq = getattr(attn, names[members[0]]).quantize_input(x.reshape(-1, x.shape[-1]))
            for i in members:
                projection = getattr(attn, names[i])
                out = (projection.from_quantized(xq, x.dtype, e4m3=True) if e4m3 and _feeds(projection)
                       else projection.from_quantized(xq, x.dtype))
                outputs[i] = out.reshape(*x.shape[:-1], projection.out_features)
        outputs = [out if out is not None else project(getattr(attn, name), x)
                   for out, name, x in zip(outputs, names, inputs)]
        return (*outputs, None)

    @staticmethod
    def _finish(attn, projected, image_layout, residual, image_shape):
        """After the output projection (b, len, out): its dropout, the image layout, the residual."""
        hidden_states = attn.to_out[1](projected)
        if image_layout:
            hidden_states = hidden_states.transpose(-1, -2).reshape(hidden_states.shape[0], *image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
