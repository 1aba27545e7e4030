"""The TLD / AT-1 denoiser in PyTorch, written from the shared spec, with the reference names."""

import math

import torch
from torch import nn
from torch.nn import functional as F


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dims):
        super().__init__()
        freqs = torch.exp(torch.linspace(math.log(1.0), math.log(1000.0), dims // 2))
        self.register_buffer("angular_speeds", 2.0 * math.pi * freqs)

    def forward(self, sigma):
        return torch.cat(
            [torch.sin(self.angular_speeds * sigma), torch.cos(self.angular_speeds * sigma)], -1
        )


def split_heads(x, n, strided):
    b, t, e = x.shape
    if strided:  # 'b t (d h) -> b h t d'
        return x.view(b, t, e // n, n).permute(0, 3, 1, 2)
    return x.view(b, t, n, e // n).transpose(1, 2)  # 'b t (h d) -> b h t d'


def merge_heads(x, strided):
    b, n, t, d = x.shape
    if strided:
        return x.permute(0, 2, 3, 1).reshape(b, t, d * n)
    return x.transpose(1, 2).reshape(b, t, n * d)


class SelfAttention(nn.Module):
    def __init__(self, e, heads, strided):
        super().__init__()
        self.qkv_linear = nn.Linear(e, 3 * e, bias=False)
        self.heads, self.strided = heads, strided

    def forward(self, x):
        q, k, v = self.qkv_linear(x).chunk(3, dim=2)
        q, k, v = (split_heads(t, self.heads, self.strided) for t in (q, k, v))
        return merge_heads(F.scaled_dot_product_attention(q, k, v), self.strided)


class CrossAttention(nn.Module):
    def __init__(self, e, heads, strided):
        super().__init__()
        self.q_linear = nn.Linear(e, e, bias=False)
        self.kv_linear = nn.Linear(e, 2 * e, bias=False)
        self.heads, self.strided = heads, strided

    def forward(self, x, y):
        q = split_heads(self.q_linear(x), self.heads, self.strided)
        k, v = self.kv_linear(y).chunk(2, dim=2)
        k, v = (split_heads(t, self.heads, self.strided) for t in (k, v))
        return merge_heads(F.scaled_dot_product_attention(q, k, v), self.strided)


class MLPSepConv(nn.Module):
    def __init__(self, e, mult, dropout):
        super().__init__()
        h = mult * e
        self.mlp = nn.Sequential(
            nn.Conv2d(e, h, 1),
            nn.Conv2d(h, h, 3, padding="same", groups=h),
            nn.GELU(),
            nn.Conv2d(h, e, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        b, t, e = x.shape
        g = math.isqrt(t)
        x = x.transpose(1, 2).reshape(b, e, g, g)
        return self.mlp(x).reshape(b, e, t).transpose(1, 2)


class DecoderBlock(nn.Module):
    def __init__(self, e, cross_heads, mult, dropout, legacy):
        super().__init__()
        self.self_attention = SelfAttention(e, e // 64, legacy)
        self.cross_attention = CrossAttention(e, cross_heads, legacy)
        self.mlp = MLPSepConv(e, mult, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(e), nn.LayerNorm(e), nn.LayerNorm(e)
        self.legacy = legacy

    def forward(self, x, cond):
        if self.legacy:
            x = self.norm1(self.self_attention(x) + x)
            x = self.norm2(self.cross_attention(x, cond) + x)
            return self.norm3(self.mlp(x) + x)
        x = x + self.self_attention(self.norm1(x))
        x = x + self.cross_attention(self.norm2(x), cond)
        return x + self.mlp(self.norm3(x))


class Unpatchify(nn.Module):
    def __init__(self, c, p, g):
        super().__init__()
        self.c, self.p, self.g = c, p, g

    def forward(self, x):  # 'b (h w) (c p1 p2) -> b c (h p1) (w p2)'
        b = x.shape[0]
        x = x.reshape(b, self.g, self.g, self.c, self.p, self.p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.c, self.g * self.p, self.g * self.p)


class Flatten(nn.Module):
    def forward(self, x):  # 'b d h w -> b (h w) d'
        return x.flatten(2).transpose(1, 2)


class DenoiserTransBlock(nn.Module):
    def __init__(self, c, size, p, e, depth, cross_heads, mult, dropout, legacy):
        super().__init__()
        pd, g = c * p * p, size // p
        self.patchify_and_embed = nn.Sequential(
            nn.Conv2d(c, pd, p, stride=p),
            Flatten(),
            nn.LayerNorm(pd),
            nn.Linear(pd, e),
            nn.LayerNorm(e),
        )
        self.register_buffer("precomputed_pos_enc", torch.arange(g * g))
        self.pos_embed = nn.Embedding(g * g, e)
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(e, cross_heads, mult, dropout, legacy) for _ in range(depth)]
        )
        self.out_proj = nn.Sequential(nn.Linear(e, pd), Unpatchify(c, p, g))

    def forward(self, x, cond):
        x = self.patchify_and_embed(x)
        x = x + self.pos_embed(self.precomputed_pos_enc[: x.size(1)].expand(x.size(0), -1))
        for block in self.decoder_blocks:
            x = block(x, cond)
        return self.out_proj(x)


class Denoiser(nn.Module):
    def __init__(self, c=4, size=16, p=2, e=128, depth=3, noise_dims=256, text_dim=768, mult=4,
                 cross_heads=None, dropout=0.0, block="prenorm"):  # fmt: skip
        super().__init__()
        legacy = block == "legacy"
        cross_heads = cross_heads or e // 64
        self.fourier_feats = nn.Sequential(
            SinusoidalEmbedding(noise_dims), nn.Linear(noise_dims, e), nn.GELU(), nn.Linear(e, e)
        )
        self.denoiser_trans_block = DenoiserTransBlock(
            c, size, p, e, depth, cross_heads, mult, dropout, legacy
        )
        self.norm = nn.LayerNorm(e)
        self.label_proj = nn.Linear(text_dim, e)

    def forward(self, x, sigma, text):
        noise = self.fourier_feats(sigma).unsqueeze(1)
        label = self.label_proj(text).unsqueeze(1)
        cond = self.norm(torch.cat([noise, label], dim=1))
        return self.denoiser_trans_block(x, cond)
