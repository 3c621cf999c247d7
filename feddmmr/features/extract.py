"""Batched, cached extraction of the text and visual feature tables.

Each table is recomputed only when its input hash changes: the hash covers the encoder identity,
the item index size and every input (each item's text, each poster file's bytes), so editing one
plot, replacing one poster or switching the encoder invalidates exactly the affected table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..global_state import preserved
from . import TEXT_FILE, VISUAL_FILE
from .store import FORMAT_VERSION, FeatureError, FeatureTable, load_table, save_table
from .text_encoder import load_text_encoder, text_encoder_identity
from .texts import ItemTexts, item_texts, known_items, movie_catalogue
from .visual_encoder import DEFAULT_CLIP, load_visual_encoder, visual_identity

log = logging.getLogger(__name__)

POSTER_SUFFIXES = (".jpg", ".jpeg", ".png")


def set_threads(threads: int | None, reserved: int = 0) -> int:
    """Torch threads: all cores minus those ``reserved`` for DataLoader decoding workers.

    Process-wide: only call it inside :func:`run_extract` (which restores the previous count).

    Measured on the 2-core machine: 1 decoding worker + 1 inference thread encodes posters about
    2x faster than 2 inference threads with decoding in-process (oversubscribed threads stall).
    """
    threads = threads or max(1, (os.cpu_count() or 1) - reserved)
    torch.set_num_threads(threads)
    return threads


def cached(path: Path, input_hash: str, num_items: int) -> FeatureTable | None:
    """The existing table if it was computed from the same inputs, else None."""
    if not path.exists():
        return None
    try:
        table = load_table(path, num_items)
    except FeatureError as exc:
        log.warning("recomputing: %s", exc)
        return None
    return table if table.meta.get("input_hash") == input_hash else None


def assemble(vectors: torch.Tensor, rows: list[int], num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter L2-normalised vectors into a zero ``[num_items, D]`` table; zero vectors stay masked."""
    features = torch.zeros(num_items, vectors.shape[1], dtype=torch.float32, device="cpu")  # saved tables: CPU
    mask = torch.zeros(num_items, dtype=torch.bool, device="cpu")
    if rows:
        vectors = vectors.float()
        good = vectors.norm(dim=1) > 0
        index = torch.as_tensor(rows, dtype=torch.long, device="cpu")[good]
        features[index] = F.normalize(vectors[good], dim=1)
        mask[index] = True
    return features, mask


def _missing(known: dict[int, object], mask: torch.Tensor) -> list:
    return [raw for index, raw in known.items() if not bool(mask[index])]


# --------------------------------------------------------------------------- text

def text_input_hash(texts: ItemTexts, num_items: int, identity: str) -> str:
    digest = hashlib.sha256(f"text\0{FORMAT_VERSION}\0{identity}\0{num_items}\0".encode())
    for index in sorted(texts.texts):
        digest.update(f"{index}\0{texts.texts[index]}\0".encode())
    return digest.hexdigest()


def extract_text(texts: ItemTexts, num_items: int, out_path: Path, encoder: str | None = None,
                 force: bool = False, batch_size: int = 64, progress: bool = True,
                 device: torch.device | str = "cpu") -> tuple[FeatureTable, str]:
    """``(table, 'cached' | 'computed')`` for the text modality, encoded on ``device`` (a resolved device;
    not part of the input hash: a table computed on another device is reused)."""
    name, identity = text_encoder_identity(encoder)
    input_hash = text_input_hash(texts, num_items, identity)
    if not force and (table := cached(out_path, input_hash, num_items)) is not None:
        log.info("%s is up to date (input hash matches); skipping text extraction", out_path)
        return table, "cached"
    started = time.perf_counter()
    model = load_text_encoder(encoder, device)
    rows = sorted(i for i in texts.texts if 0 < i < num_items)
    log.info("encoding %d item texts with %s on %s", len(rows), name, device)
    vectors = model.encode([texts.texts[i] for i in rows], batch_size=batch_size, progress=progress)
    if not rows:
        vectors = torch.zeros(0, model.dim, device="cpu")
    features, mask = assemble(vectors, rows, num_items)
    meta = {
        "modality": "text", "format_version": FORMAT_VERSION, "encoder": name, "encoder_identity": identity,
        "dim": int(features.shape[1]), "num_items": num_items, "coverage": int(mask.sum()),
        "input_hash": input_hash, "sources": texts.source_counts(), "missing": _missing(texts.known, mask),
        "seconds": round(time.perf_counter() - started, 2), "device": str(device),
    }
    table = FeatureTable(features, mask, meta)
    save_table(table, out_path)
    return table, "computed"


# --------------------------------------------------------------------------- visual

def find_posters(folder: Path | None, known: dict[int, object]) -> dict[int, Path]:
    """Item index -> poster file ``<raw id>.jpg`` (or .jpeg/.png) for every known item that has one."""
    if folder is None or not folder.is_dir():
        if folder is not None:
            log.warning("poster folder %s not found: no visual features", folder)
        return {}
    names = set(os.listdir(folder))
    found: dict[int, Path] = {}
    for index, raw in known.items():
        for suffix in POSTER_SUFFIXES:
            if f"{raw}{suffix}" in names and (folder / f"{raw}{suffix}").is_file():  # not a folder or dead link
                found[index] = folder / f"{raw}{suffix}"
                break
    return found


def poster_input_hash(posters: dict[int, Path], num_items: int, identity: str) -> str:
    digest = hashlib.sha256(f"visual\0{FORMAT_VERSION}\0{identity}\0{num_items}\0".encode())
    for index in sorted(posters):
        digest.update(f"{index}\0".encode() + hashlib.sha256(posters[index].read_bytes()).digest())
    return digest.hexdigest()


class PosterDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one poster; a broken file yields None instead of an exception."""

    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        from PIL import Image

        try:
            with Image.open(self.paths[position]) as image:
                pixels = self.preprocess(image.convert("RGB"))
            return position, pixels, None
        except Exception as exc:  # truncated, corrupt, not an image, decompression bomb, ...
            return position, None, f"{type(exc).__name__}: {exc}"


def collate_posters(batch: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(position, pixels) for position, pixels, _ in batch if pixels is not None]
    failed = [(position, error) for position, pixels, error in batch if pixels is None]
    stacked = torch.stack([pixels for _, pixels in good]) if good else None
    return [position for position, _ in good], stacked, failed


def extract_visual(posters: dict[int, Path], known: dict[int, object], num_items: int, out_path: Path,
                   encoder: str = "efficientnet-lite0", clip_path: str | None = None, force: bool = False,
                   batch_size: int = 32, workers: int = 0, progress: bool = True,
                   device: torch.device | str = "cpu") -> tuple[FeatureTable, str]:
    """``(table, 'cached' | 'computed')`` for the poster modality, encoded on ``device`` (a resolved
    device; not part of the input hash); unreadable images count as missing."""
    from tqdm import tqdm

    identity = visual_identity(encoder, clip_path)
    rows = sorted(i for i in posters if 0 < i < num_items)
    input_hash = poster_input_hash({i: posters[i] for i in rows}, num_items, identity)
    if not force and (table := cached(out_path, input_hash, num_items)) is not None:
        log.info("%s is up to date (input hash matches); skipping visual extraction", out_path)
        return table, "cached"
    started = time.perf_counter()
    model = load_visual_encoder(encoder, clip_path, device)
    loader = torch.utils.data.DataLoader(
        PosterDataset([posters[i] for i in rows], model.preprocess), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate_posters, persistent_workers=False)
    vectors = torch.zeros(len(rows), model.dim, device="cpu")  # the encoder's output comes back to the CPU
    decoded = torch.zeros(len(rows), dtype=torch.bool, device="cpu")
    errors: list[tuple[int, str]] = []
    log.info("encoding %d posters with %s on %s (batch %d, %d loader worker(s), %d threads)", len(rows), model.name,
             device, batch_size, workers, torch.get_num_threads())
    with tqdm(total=len(rows), desc="posters", unit="img", file=sys.stderr, disable=not progress) as bar:
        for positions, pixels, failed in loader:
            if pixels is not None:
                vectors[positions] = model.embed(pixels).float()
                decoded[positions] = True
            errors.extend(failed)
            bar.update(len(positions) + len(failed))
    unreadable = [known.get(rows[position], rows[position]) for position, _ in errors]
    for position, error in errors[:10]:
        log.warning("unreadable poster %s: %s", posters[rows[position]], error)
    if errors:
        log.warning("%d unreadable poster(s) counted as missing", len(errors))
    keep = decoded.nonzero().flatten().tolist()
    features, mask = assemble(vectors[keep], [rows[k] for k in keep], num_items)
    meta = {
        "modality": "visual", "format_version": FORMAT_VERSION, "encoder": model.name, "encoder_identity": identity,
        "dim": int(features.shape[1]), "num_items": num_items, "coverage": int(mask.sum()),
        "input_hash": input_hash,
        "sources": {"poster": int(mask.sum()), "no_poster": len([i for i in known if i not in posters]),
                    "unreadable": len(errors)},
        "missing": _missing(known, mask), "unreadable": unreadable,
        "seconds": round(time.perf_counter() - started, 2), "device": str(device),
    }
    if encoder == "clip":
        meta["clip_source"] = str(clip_path or DEFAULT_CLIP)
    table = FeatureTable(features, mask, meta)
    save_table(table, out_path)
    return table, "computed"


# --------------------------------------------------------------------------- both

def data_folder(data_path: Path) -> Path:
    return data_path if data_path.is_dir() else data_path.parent


def run_extract(data, data_path: Path, out_dir: Path, text_encoder: str | None = None,
                visual_encoder: str = "efficientnet-lite0", clip_path: str | None = None,
                posters: Path | None = None, item_text: Path | None = None, modalities=("text", "visual"),
                force: bool = False, text_batch: int = 64, visual_batch: int = 32, workers: int = 0,
                threads: int | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """Extract the requested modalities for a loaded ``SequenceDataset``; returns a summary per modality.

    ``device`` (``cpu``, ``cuda``, ``auto``) is where the encoders run; the tables are always saved
    from the CPU.

    ``threads`` (and the DataLoader ``workers``) size torch's threads for the extraction only: the
    thread count, default dtype, grad mode and global RNG states are restored on return
    (:func:`feddmmr.global_state.preserved`), so a run that extracts its features in-process trains
    with the threads, and draws the numbers, of a run that finds them cached.
    """
    resolved = resolve_device(device, "--device")
    with preserved():
        return _run_extract(data, data_path, out_dir, text_encoder, visual_encoder, clip_path, posters, item_text,
                            modalities, force, text_batch, visual_batch, workers, threads, progress, resolved)


def _run_extract(data, data_path: Path, out_dir: Path, text_encoder: str | None, visual_encoder: str,
                 clip_path: str | None, posters: Path | None, item_text: Path | None, modalities, force: bool,
                 text_batch: int, visual_batch: int, workers: int, threads: int | None, progress: bool,
                 device: torch.device) -> dict:
    folder = data_folder(Path(data_path))
    catalogue = movie_catalogue(folder) if data.item_raw_ids is None else None
    known = known_items(data.item_raw_ids, data.occurring_items(), catalogue)
    summary: dict = {}
    if "text" in modalities:
        texts = item_texts(folder, data.item_raw_ids, data.num_items, known, item_text,
                           getattr(data, "item_texts", None))
        set_threads(threads)
        table, status = extract_text(texts, data.num_items, out_dir / TEXT_FILE, text_encoder, force,
                                     text_batch, progress, device)
        summary["text"] = _summary(table, status, out_dir / TEXT_FILE)
    if "visual" in modalities:
        poster_dir = posters if posters is not None else folder / "posters"
        found = find_posters(poster_dir, known)
        set_threads(threads, reserved=workers)
        table, status = extract_visual(found, known, data.num_items, out_dir / VISUAL_FILE, visual_encoder,
                                       clip_path, force, visual_batch, workers, progress, device)
        summary["visual"] = _summary(table, status, out_dir / VISUAL_FILE)
    return summary


def _summary(table: FeatureTable, status: str, path: Path) -> dict:
    meta = table.meta
    return {"status": status, "file": str(path), "encoder": meta["encoder"], "dim": table.dim,
            "num_items": table.num_items, "coverage": table.coverage, "sources": meta.get("sources", {}),
            "missing": len(meta.get("missing", [])), "seconds": meta.get("seconds")}
