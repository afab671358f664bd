"""Grad-CAM: where in the image the predicted class's evidence lies, computed in the forward pass.

Grad-CAM weighs each channel of the body's last feature map by the mean gradient of the class logit
with respect to it. For fastai's head (pooling, batch norm, dropout, linear layers, ReLU) in eval mode
that gradient has a closed form, so `WithHeatmap` computes it with plain tensor operations: the model
exports to one ONNX graph that returns the heatmap beside the logits, and the apps show it with ONNX
Runtime alone. The report uses the same module.
"""
import torch
from fastai.layers import AdaptiveConcatPool2d, Flatten
from torch import nn


class WithHeatmap(nn.Module):
    """fastai's (body, head) classifier returning (logits, heatmap): the predicted class's Grad-CAM, h×w of
    the feature map, scaled to [0, 1]."""

    def __init__(self, model):
        super().__init__()
        self.body, self.head = model[0], model[1]
        for layer in self.head:
            if not isinstance(layer, (AdaptiveConcatPool2d, nn.AdaptiveAvgPool2d, Flatten, nn.Flatten, nn.BatchNorm1d,
                                      nn.Dropout, nn.Linear, nn.ReLU)):
                raise ValueError(f"no closed-form gradient through {type(layer).__name__}")

    def forward(self, x):
        features = self.body(x)
        outs, h = [], features
        for layer in self.head:
            h = layer(h)
            outs.append(h)
        logits = h
        grad = (logits == logits.max(dim=1, keepdim=True).values).to(logits.dtype)  # d(top logit)/d(logits)
        for i in range(len(self.head) - 1, 0, -1):  # back to the pooled features (the head's first layer's output)
            layer = self.head[i]
            if isinstance(layer, nn.Linear):
                grad = grad @ layer.weight
            elif isinstance(layer, nn.BatchNorm1d):
                grad = grad * layer.weight / torch.sqrt(layer.running_var + layer.eps)
            elif isinstance(layer, nn.ReLU):
                grad = grad * (outs[i] > 0).to(grad.dtype)
        grad = grad.flatten(1)
        c = features.shape[1]
        if isinstance(self.head[0], AdaptiveConcatPool2d):  # max pool then average pool
            grad = grad[:, :c] + grad[:, c:]  # a max pool's gradient, averaged over the map, is the same as an average pool's
        alpha = grad / (features.shape[2] * features.shape[3])
        cam = torch.relu((alpha[:, :, None, None] * features).sum(1))
        peak = cam.flatten(1).max(dim=1).values[:, None, None]
        # A map with no evidence anywhere is all zeros: 0/0. Clamped, not `peak + 1e-8`: the ONNX exporter's
        # optimizer drops the addition of so small a constant as if it added nothing.
        return logits, cam / peak.clamp_min(1e-8)
