"""Multimodal item features: per-item text (Sentence-BERT) and poster (EfficientNet-Lite0 / CLIP)
embeddings, stored as ``text_features.pt`` and ``visual_features.pt``.

Other modules load them with ``from feddmmr.features.store import load_features, FeatureTable``.
Heavy libraries (torch, sentence-transformers, transformers) are imported inside the modules
that need them, so importing this package stays cheap.
"""

TEXT_FILE = "text_features.pt"
VISUAL_FILE = "visual_features.pt"


class EncoderError(RuntimeError):
    """An encoder cannot be loaded (e.g. a model name that needs the network while offline)."""
