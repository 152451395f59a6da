"""Transcriptions of the papers' official code that more than one test file uses as an independent oracle, each kept
once here. Every function follows its repository's lines (names kept, .cuda() calls dropped); its docstring names the
repository and file it transcribes. Test files import what they need (`from official_code import ...`), as they do
from fixtures.py. Transcriptions that a single test file uses stay in that file."""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torch import nn


# ---- TENT: github.com/DequanWang/tent at e9e926a668d85244c66a6d5c006efbd2b82e83e8 --------------------------------
def softmax_entropy(x):
    """github.com/DequanWang/tent tent.py softmax_entropy: the entropy of the softmax of logits, per sample."""
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


@torch.enable_grad()
def tent_forward_and_adapt(x, model, optimizer):
    """github.com/DequanWang/tent tent.py forward_and_adapt: one step on the mean entropy; the outputs from before
    the step. The TTA zoo's (github.com/mariodoebler/test-time-adaptation classification/methods/tent.py
    Tent.forward_and_adapt, single precision) is the same step."""
    outputs = model(x)
    loss = softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs


def tent_configure_model(model):
    """github.com/DequanWang/tent tent.py configure_model: train mode, every parameter off but BatchNorm2d's, which
    normalises with batch statistics. github.com/mr-eggplant/EATA eata.py configure_model is these lines too."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def tent_collect_params(model):
    """github.com/DequanWang/tent tent.py collect_params: BatchNorm2d's weight and bias, with their names.
    github.com/mr-eggplant/EATA eata.py collect_params is these lines too."""
    params, names = [], []
    for nm, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    params.append(p)
                    names.append(f"{nm}.{np_}")
    return params, names


# ---- SAR: github.com/mr-eggplant/SAR ---------------------------------------------------------------------------
def sar_collect_params(model):
    """github.com/mr-eggplant/SAR sar.py collect_params: the norm layers' weight and bias, with their names, outside
    layer4, blocks.9-11, modules whose name contains "norm." and the module named norm."""
    params, names = [], []
    for nm, m in model.named_modules():
        if "layer4" in nm or "blocks.9" in nm or "blocks.10" in nm or "blocks.11" in nm:
            continue
        if "norm." in nm:
            continue
        if nm in ["norm"]:
            continue
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    params.append(p)
                    names.append(f"{nm}.{np_}")
    return params, names


# ---- CoTTA: github.com/qinenergy/cotta --------------------------------------------------------------------------
def cotta_configure_model(model):
    """github.com/qinenergy/cotta imagenet/cotta.py (and cifar/cotta.py) configure_model: train mode, every
    parameter on, BatchNorm2d on batch statistics."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        else:
            m.requires_grad_(True)
    return model


def cotta_collect_params(model):
    """github.com/qinenergy/cotta imagenet/cotta.py (and cifar/cotta.py) collect_params: module by module, the
    parameters named exactly weight or bias that require grad (m.named_parameters() recurses, but a child's are
    named child.weight, so each module contributes its own), with their names."""
    params, names = [], []
    for nm, m in model.named_modules():
        for np_, p in m.named_parameters():
            if np_ in ["weight", "bias"] and p.requires_grad:
                params.append(p)
                names.append(f"{nm}.{np_}")
    return params, names


def cotta_softmax_entropy(x, x_ema, imagenet):
    """github.com/qinenergy/cotta softmax_entropy, the student's loss per sample against the teacher's outputs: the
    cross-entropy of cifar/cotta.py, or with `imagenet` the symmetric one of imagenet/cotta.py. The TTA zoo's
    (github.com/mariodoebler/test-time-adaptation classification/methods/cotta.py softmax_entropy_cifar
    and softmax_entropy_imagenet) are the same two."""
    if imagenet:
        return (-0.5 * (x_ema.softmax(1) * x.log_softmax(1)).sum(1)
                - 0.5 * (x.softmax(1) * x_ema.log_softmax(1)).sum(1))
    return -(x_ema.softmax(1) * x.log_softmax(1)).sum(1)


class ColorJitterPro(T.ColorJitter):
    """github.com/qinenergy/cotta cifar/my_transforms.py (and imagenet/my_transforms.py) ColorJitterPro, forward
    only. The TTA zoo's (github.com/mariodoebler/test-time-adaptation classification/augmentations/
    transforms_cotta.py ColorJitterPro) is the same class."""

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0, gamma=0):
        super().__init__(brightness, contrast, saturation, hue)
        self.gamma = self._check_input(gamma, "gamma")

    def forward(self, img):
        fn_idx = torch.randperm(5)
        for fn_id in fn_idx:
            if fn_id == 0 and self.brightness is not None:
                img = TF.adjust_brightness(img, torch.tensor(1.0).uniform_(*self.brightness).item())
            if fn_id == 1 and self.contrast is not None:
                img = TF.adjust_contrast(img, torch.tensor(1.0).uniform_(*self.contrast).item())
            if fn_id == 2 and self.saturation is not None:
                img = TF.adjust_saturation(img, torch.tensor(1.0).uniform_(*self.saturation).item())
            if fn_id == 3 and self.hue is not None:
                img = TF.adjust_hue(img, torch.tensor(1.0).uniform_(*self.hue).item())
            if fn_id == 4 and self.gamma is not None:
                gamma_factor = torch.tensor(1.0).uniform_(*self.gamma).item()
                img = img.clamp(1e-8, 1.0)
                img = TF.adjust_gamma(img, gamma_factor)
        return img


def cotta_get_tta_transforms(img_size, gaussian_std=0.005):
    """github.com/qinenergy/cotta cifar/cotta.py (and imagenet/cotta.py) get_tta_transforms(soft=False), with the
    image side given (the authors fix it: 32 for CIFAR, 224 for ImageNet): an int, or (height, width) whose first
    entry counts. torchvision's resample=BILINEAR, fillcolor=None there is today's interpolation=BILINEAR with the
    default fill (0); my_transforms.Clip and GaussianNoise written inline. The TTA zoo's
    (github.com/mariodoebler/test-time-adaptation classification/augmentations/transforms_cotta.py
    get_tta_transforms(img_size, soft=False, padding_mode='edge', cotta_augs=True), fill=0) is the same list."""
    n_pixels = img_size[0] if isinstance(img_size, (list, tuple)) else img_size
    return T.Compose([
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0)),
        ColorJitterPro(brightness=[0.6, 1.4], contrast=[0.7, 1.3], saturation=[0.5, 1.5], hue=[-0.06, 0.06],
                       gamma=[0.7, 1.3]),
        T.Pad(padding=int(n_pixels / 2), padding_mode="edge"),
        T.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                       interpolation=T.InterpolationMode.BILINEAR),
        T.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]),
        T.CenterCrop(size=n_pixels),
        T.RandomHorizontalFlip(p=0.5),
        T.Lambda(lambda img: img + (torch.randn(img.size()) * gaussian_std + 0.0).to(img.device)),
        T.Lambda(lambda img: torch.clip(img, 0.0, 1.0)),
    ])
