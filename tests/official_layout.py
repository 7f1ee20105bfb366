"""PyTorch networks with the official EMANet code's structure and state-dict names
(XiaLiPKU/EMANet network.py), written for the tests from the paper and REFERENCE.md.

Widths are parameters so that the tests run them tiny: `w` is layer1's bottleneck width (64 in
the official code; the deep stem is w, w, 2w), `head` the channels around the unit (512), `mid`
the channels after it (256).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-5)


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, dilation, project):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), bn(4 * planes)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), bn(4 * planes))
            if project else None
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def stage(cin, planes, blocks, stride, dilations):
    """dilations: one per block."""
    layers = [Bottleneck(cin, planes, stride, dilations[0], True)]
    layers += [Bottleneck(4 * planes, planes, 1, d, False) for d in dilations[1:]]
    return nn.Sequential(*layers)


def extractor(w, stages, output_stride):
    """extractor.0 deep stem, .1 bn1, .2 relu, .3 maxpool, .4-.7 layer1-4."""
    stem = nn.Sequential(
        nn.Conv2d(3, w, 3, 2, 1, bias=False), bn(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, 1, 1, bias=False), bn(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False),
    )
    grid = (1, 2, 4)
    # (stride, per-block dilations) of layer3 and layer4, as the paper's dilated ResNet.
    if output_stride == 8:
        l3 = (1, [1] + [2] * (stages[2] - 1))
        l4 = (1, [2] + [4 * g for g in grid[1:]])
    else:
        l3 = (2, [1] * stages[2])
        l4 = (1, [1] + [2 * g for g in grid[1:]])
    layers = [
        stage(2 * w, w, stages[0], 1, [1] * stages[0]),
        stage(4 * w, 2 * w, stages[1], 2, [1] * stages[1]),
        stage(8 * w, 4 * w, stages[2], l3[0], l3[1]),
        stage(16 * w, 8 * w, stages[3], l4[0], l4[1]),
    ]
    return nn.Sequential(stem, bn(2 * w), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *layers)


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), bn(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Unit(nn.Module):
    """The EM unit: buffer mu [1, C, K], conv1 (bias), conv2 = conv (no bias) + BN.

    eta = 1, temperature 1, l2 normalisation: EMANet's EMAU. Otherwise HEM (eq. 8, 13)."""

    def __init__(self, c, k, iters, eta, temperature, l2):
        super().__init__()
        self.iters, self.eta, self.temperature, self.l2 = iters, eta, temperature, l2
        self.register_buffer("mu", torch.zeros(1, c, k))
        self.conv1 = nn.Conv2d(c, c, 1)
        self.conv2 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), bn(c))

    def forward(self, x):
        idn = x
        x = self.conv1(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)
        mu = self.mu.expand(b, -1, -1)  # [B, C, K]
        for _ in range(self.iters):
            z = torch.softmax(torch.einsum("bcn,bck->bnk", x, mu) / self.temperature, dim=2)
            f_em = torch.einsum("bcn,bnk->bck", x, z / (1e-6 + z.sum(dim=1, keepdim=True)))
            mu = (1 - self.eta) * mu + self.eta * f_em
            if self.l2:
                mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
        x = F.relu(torch.einsum("bck,bnk->bcn", mu, z).reshape(b, c, h, w))
        return F.relu(self.conv2(x) + idn)


class OfficialNet(nn.Module):
    """extractor -> fc0 -> emau -> fc1 (ConvBNReLU, Dropout2d) -> fc2 -> bilinear, corners."""

    def __init__(self, *, classes, w, stages, output_stride, head, mid, k, iters, eta,
                 temperature, l2):
        super().__init__()
        self.extractor = extractor(w, stages, output_stride)
        self.fc0 = ConvBNReLU(32 * w, head)
        self.emau = Unit(head, k, iters, eta, temperature, l2)
        self.fc1 = nn.Sequential(ConvBNReLU(head, mid), nn.Dropout2d(0.1))
        self.fc2 = nn.Conv2d(mid, classes, 1)

    def forward(self, img):
        x = self.fc2(self.fc1(self.emau(self.fc0(self.extractor(img)))))
        return F.interpolate(x, size=img.shape[-2:], mode="bilinear", align_corners=True)


def randomize(net, seed):
    """Random weights, BN statistics and bases, so that no layer is an identity; eval mode."""
    g = torch.Generator().manual_seed(seed)

    def fill(t, values):
        t.copy_(values)

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.weight[0].numel()
                fill(m.weight, torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan))
                if m.bias is not None:
                    fill(m.bias, 0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                fill(m.weight, 0.5 + torch.rand(c, generator=g))
                fill(m.bias, 0.1 * torch.randn(c, generator=g))
                fill(m.running_mean, 0.1 * torch.randn(c, generator=g))
                fill(m.running_var, 0.5 + torch.rand(c, generator=g))
            elif isinstance(m, Unit):
                mu = torch.randn(m.mu.shape, generator=g)
                fill(m.mu, mu / mu.norm(dim=1, keepdim=True))
    return net.eval()
