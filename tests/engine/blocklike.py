"""Hand-built replicas of architectures whose blocks the old "auto" rule missed (issue 26), built offline.

Each keeps the module tree of the original (class nesting, attribute names, containers) at a tiny width:
torchvision's GoogLeNet, timm's RegNet (blocks as plain attributes ``s1.b1``), the widely copied U-Net
(``inc, down1-3, up1-3, outc``), a mixture-of-experts layer, ``nn.MultiheadAttention`` used directly, timm's RepVGG
(a stem that is a block) and LeViT (stages with a downsampling unit).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


# ---- GoogLeNet (torchvision layout) -----------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, cin: int, c: int = 4) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, c, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c, kernel_size=1), BasicConv2d(c, c, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c, kernel_size=1), BasicConv2d(c, c, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), BasicConv2d(cin, c, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.conv = BasicConv2d(cin, 8, kernel_size=1)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        x = self.conv(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class GoogLeNet(nn.Module):
    NAMES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = BasicConv2d(8, 8, kernel_size=1)
        self.conv3 = BasicConv2d(8, 16, kernel_size=3, padding=1)
        for name in self.NAMES:
            setattr(self, "inception" + name, Inception(16))
        self.aux1 = InceptionAux(16, classes)
        self.aux2 = InceptionAux(16, classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.conv3(self.conv2(self.maxpool1(self.conv1(x))))
        aux = []
        for i, name in enumerate(self.NAMES):
            x = getattr(self, "inception" + name)(x)
            if self.training and name in ("4a", "4d"):
                aux.append((self.aux1 if name == "4a" else self.aux2)(x))
        out = self.fc(self.dropout(self.avgpool(x).flatten(1)))
        return out + sum(aux) * 0.3 if aux else out


# ---- RegNet (timm layout: stages and blocks as plain attributes) -------------------------------------------------

class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout)
        self.conv2 = ConvNormAct(cout, cout, 3, stride)
        self.se = SEModule(cout)
        self.conv3 = ConvNormAct(cout, cout, act=False)
        self.act3 = nn.ReLU()
        self.downsample = ConvNormAct(cin, cout, 1, stride, act=False) if (stride != 1 or cin != cout) \
            else nn.Identity()

    def forward(self, x):
        return self.act3(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.downsample(x))


class RegStage(nn.Module):
    def __init__(self, depth: int, cin: int, cout: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout, 2 if i == 0 else 1))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class RegNet(nn.Module):
    def __init__(self, depths=(1, 1, 4, 7), classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, 2)
        widths = (8, 8, 16, 16)
        cin = 8
        for i, (d, w) in enumerate(zip(depths, widths)):
            setattr(self, f"s{i + 1}", RegStage(d, cin, w))
            cin = w
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stem(x)
        for i in range(4):
            x = getattr(self, f"s{i + 1}")(x)
        return self.head(x.mean((2, 3)))


# ---- U-Net (the widely copied layout) ---------------------------------------------------------------------------

class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
        return self.conv(torch.cat([x2, self.up(x1)], dim=1))


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


class UNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 2, c: int = 4) -> None:
        super().__init__()
        self.inc = DoubleConv(channels, c)
        self.down1, self.down2, self.down3 = Down(c, 2 * c), Down(2 * c, 4 * c), Down(4 * c, 8 * c)
        self.up1, self.up2, self.up3 = Up(8 * c, 4 * c), Up(4 * c, 2 * c), Up(2 * c, c)
        self.outc = OutConv(c, classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        return self.outc(self.up3(self.up2(self.up1(x4, x3), x2), x1))


# ---- a mixture of experts ---------------------------------------------------------------------------------------

class Expert(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """Top-1 routing over experts in a ModuleList; ``gate`` is a Linear (Mixtral style) or a raw Parameter of
    shape (d, experts) (``w_gate``, the widely copied sparsely-gated MoE)."""

    def __init__(self, d: int = 8, experts: int = 6, raw_gate: bool = False) -> None:
        super().__init__()
        if raw_gate:
            self.w_gate = nn.Parameter(torch.randn(d, experts) * 0.1)
        else:
            self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList([Expert(d) for _ in range(experts)])

    def forward(self, x):
        logits = x @ self.w_gate if hasattr(self, "w_gate") else self.gate(x)
        weight, idx = logits.softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = idx == e
            if chosen.any():
                out = out.index_put((chosen,), expert(x[chosen]) * weight[chosen, None])
        return x + out


class MoEModel(nn.Module):
    def __init__(self, d: int = 8, raw_gate: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.moe1, self.moe2 = MoE(d, raw_gate=raw_gate), MoE(d, raw_gate=raw_gate)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.moe2(self.moe1(self.embed(x))))


# ---- nn.MultiheadAttention used directly ------------------------------------------------------------------------

class AttentionNet(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.proj(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h + self.ff(h))


# ---- RepVGG (timm ByobNet layout: the stem is a RepVggBlock) -----------------------------------------------------

class RepVggBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, act=False)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, act=False)
        self.drop_path, self.attn, self.act = nn.Identity(), nn.Identity(), nn.ReLU()

    def forward(self, x):
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(self.attn(y))


class RepVGG(nn.Module):
    def __init__(self, depths=(2, 3, 2), classes: int = 10) -> None:
        super().__init__()
        self.stem = RepVggBlock(3, 8, 2)
        stages, cin = [], 8
        for d in depths:
            stages.append(nn.Sequential(*[RepVggBlock(cin if i == 0 else 8, 8, 2 if i == 0 else 1)
                                          for i in range(d)]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# ---- LeViT (timm layout: a Sequential stem of ConvNorm, stages with a downsampling unit) ------------------------

class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.linear = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.linear(x))


class Stem16(nn.Sequential):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = ConvNorm(3, 4, 2), nn.Hardswish()
        self.conv2, self.act2 = ConvNorm(4, 8, 2), nn.Hardswish()


class LinearNorm(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(self.linear(x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1)


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = LinearNorm(d, 3 * d)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(d, d))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj((q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1) @ v)


class LevitMlp(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.act, self.ln2 = LinearNorm(d, 2 * d), nn.Hardswish(), LinearNorm(2 * d, d)

    def forward(self, x):
        return self.ln2(self.act(self.ln1(x)))


class LevitBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(d), LevitMlp(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class AttentionDownsample(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.kv = LinearNorm(cin, 2 * cout)
        self.q = nn.Sequential(nn.Identity(), LinearNorm(cin, cout))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(cout, cout))

    def forward(self, x):
        k, v = self.kv(x).chunk(2, -1)
        q = self.q(x[:, ::2])
        return self.proj((q @ k.transpose(1, 2)).softmax(-1) @ v)


class LevitDownsample(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.attn_downsample = AttentionDownsample(cin, cout)
        self.mlp = LevitMlp(cout)

    def forward(self, x):
        x = self.attn_downsample(x)
        return x + self.mlp(x)


class LevitStage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int) -> None:
        super().__init__()
        self.downsample = LevitDownsample(cin, cout) if cin != cout else nn.Identity()
        self.blocks = nn.Sequential(*[LevitBlock(cout) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class Levit(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = Stem16()
        self.stages = nn.Sequential(LevitStage(8, 8, 2), LevitStage(8, 12, 3), LevitStage(12, 16, 4))
        self.head = LinearNorm(16, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.stages(x)).mean(1)
