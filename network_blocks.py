"""Leaf blocks of the StackMFF-V2 network.

Parameter names follow the authors' released checkpoint (see
``docs/architecture.md``) so that it loads with ``strict=True``.
"""
import torch
import torch.nn as nn


class InceptionDWConv(nn.Module):
    """1x1 channel adjustment, then depthwise convs on three small channel groups.

    The ``o`` output channels of the 1x1 conv are split into
    ``[o - 3g identity, g (3x3), g (1x11), g (11x1)]`` with
    ``g = max(1, int(o * branch_ratio))``; only the three ``g`` groups are
    convolved (depthwise, with bias), the identity part passes through.

    Input (B, i, H, W) -> output (B, o, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, branch_ratio: float = 0.125,
                 square_kernel: int = 3, band_kernel: int = 11):
        super().__init__()
        # The released network always changes the channel count, so the 1x1
        # conv is present in every block; keep it optional for i == o.
        self.channel_adj = (nn.Conv2d(in_channels, out_channels, 1)
                            if in_channels != out_channels else nn.Identity())
        g = max(1, int(out_channels * branch_ratio))
        self.split_sizes = (out_channels - 3 * g, g, g, g)
        self.dwconv_hw = nn.Conv2d(g, g, square_kernel, padding=square_kernel // 2, groups=g)
        self.dwconv_w = nn.Conv2d(g, g, (1, band_kernel), padding=(0, band_kernel // 2), groups=g)
        self.dwconv_h = nn.Conv2d(g, g, (band_kernel, 1), padding=(band_kernel // 2, 0), groups=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_adj(x)
        identity, x_hw, x_w, x_h = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((identity, self.dwconv_hw(x_hw), self.dwconv_w(x_w), self.dwconv_h(x_h)), dim=1)


class SpatialAttention(nn.Module):
    """One shared 7x7 dilated conv on [mean, max] over channels, then sigmoid.

    Applied to each skip tensor t (B, C, h, w): returns t * attention (B, C, h, w).
    """

    def __init__(self):
        super().__init__()
        # A Sequential of one conv, to keep the released key ``shared_conv2d.0``.
        self.shared_conv2d = nn.Sequential(nn.Conv2d(2, 1, 7, padding=9, dilation=3))

    def forward(self, skips):
        out = []
        for t in skips:
            pooled = torch.cat((t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)), dim=1)  # (B, 2, h, w)
            out.append(t * torch.sigmoid(self.shared_conv2d(pooled)))
        return out


class ChannelAttention(nn.Module):
    """Channel weights for all skips at once from their pooled, concatenated means.

    The per-channel means of every skip form one length-sum(C) sequence; a
    1-D conv mixes neighbours, and one linear layer per skip maps the whole
    sequence to that skip's channel weights in (0, 1).
    """

    def __init__(self, channels):
        super().__init__()
        total = sum(channels)
        self.get_all_att = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        for k, c in enumerate(channels, start=1):
            setattr(self, f"att{k}", nn.Linear(total, c))
        self.num_skips = len(channels)

    def forward(self, skips):
        pooled = torch.cat([t.mean(dim=(2, 3)) for t in skips], dim=1)  # (B, sum C)
        return self.weights_from_pooled(pooled)

    def weights_from_pooled(self, pooled):
        """Per-skip channel weights (B, C_k, 1, 1) in (0, 1) from the pooled means (B, sum C)."""
        mixed = self.get_all_att(pooled.unsqueeze(1)).squeeze(1)        # (B, sum C)
        weights = []
        for k in range(1, self.num_skips + 1):
            a = torch.sigmoid(getattr(self, f"att{k}")(mixed))           # (B, C_k)
            weights.append(a[:, :, None, None])
        return weights


class SpatialChannelBridge(nn.Module):
    """Skip bridge: spatial attention, residual, then channel attention.

    For every skip t: s = t * spatial(t); u = s + t; skip = channel(u) * u + s.
    """

    def __init__(self, channels):
        super().__init__()
        self.satt = SpatialAttention()
        self.catt = ChannelAttention(channels)

    def forward(self, skips):
        spatial = self.satt(skips)
        mixed = [s + t for s, t in zip(spatial, skips)]
        weights = self.catt(mixed)
        return [a * u + s for a, u, s in zip(weights, mixed, spatial)]


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell: reset/update gates from one conv, candidate from another.

    x (B, Cin, H, W), h (B, Ch, H, W) -> new h (B, Ch, H, W).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        padding = kernel_size // 2
        self.hidden_channels = hidden_channels
        self.conv_gates = nn.Conv2d(input_channels + hidden_channels, 2 * hidden_channels,
                                    kernel_size, padding=padding)
        self.conv_can = nn.Conv2d(input_channels + hidden_channels, hidden_channels,
                                  kernel_size, padding=padding)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gates = self.conv_gates(torch.cat((x, h), dim=1))
        reset, update = torch.sigmoid(gates).chunk(2, dim=1)
        candidate = torch.tanh(self.conv_can(torch.cat((x, reset * h), dim=1)))
        return (1 - update) * h + update * candidate


class BidirectionalConvGRU(nn.Module):
    """One-layer bidirectional ConvGRU along the slice axis.

    x (B, N, Cin, H, W) -> forward + backward hidden states (B, N, Ch, H, W).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3):
        super().__init__()
        self.hidden_channels = hidden_channels
        # ModuleLists of one cell keep the released keys ``*_cell_list.0``.
        self.forward_cell_list = nn.ModuleList([ConvGRUCell(input_channels, hidden_channels, kernel_size)])
        self.backward_cell_list = nn.ModuleList([ConvGRUCell(input_channels, hidden_channels, kernel_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _, h, w = x.shape
        zeros = x.new_zeros(b, self.hidden_channels, h, w)
        forward_cell, backward_cell = self.forward_cell_list[0], self.backward_cell_list[0]
        forward_states, state = [], zeros
        for t in range(n):
            state = forward_cell(x[:, t], state)
            forward_states.append(state)
        backward_states, state = [None] * n, zeros
        for t in reversed(range(n)):
            state = backward_cell(x[:, t], state)
            backward_states[t] = state
        return torch.stack([f + bk for f, bk in zip(forward_states, backward_states)], dim=1)  # (B, N, Ch, H, W)
