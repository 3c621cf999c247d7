"""Multimodal item features: texts, extraction (cache, masks, norms), encoders, check, loader errors.

Unit tests use tiny synthetic data in tmp_path, a tiny random sentence-transformers model and a
tiny random CLIP; only EfficientNet-Lite0 (shipped offline, ~19 MB) and, in the integration
test, MiniLM are real.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from feddmmr.cli import main  # noqa: E402
from feddmmr.data.dataset import load_dataset  # noqa: E402
from feddmmr.data.readers import DataError  # noqa: E402
from feddmmr.features.check import modality_check  # noqa: E402
from feddmmr.features.extract import extract_text, extract_visual, find_posters, run_extract  # noqa: E402
from feddmmr.features.store import FeatureError, FeatureTable, load_features, load_table, save_table  # noqa: E402
from feddmmr.features.texts import ItemTexts, movie_texts, split_title  # noqa: E402

ML1M = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-1m"


# --------------------------------------------------------------------------- fixtures

def write_ml1m(folder: Path, movies: dict[int, tuple[str, str]], sequences: dict[int, list[int]],
               plots: dict[int, str] | None = None, abstracts: dict[int, str] | None = None) -> Path:
    """A tiny ML-1M 'ordered' folder: interactions, movies.dat and optional text files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["UserID\tMovieID\tSeqPos"]
    for user, items in sequences.items():
        lines += [f"{user}\t{item}\t{pos}" for pos, item in enumerate(items)]
    (folder / "interactions_all_users_ordered.tsv").write_text("\n".join(lines) + "\n")
    (folder / "movies.dat").write_bytes("\n".join(f"{m}::{t}::{g}" for m, (t, g) in movies.items())
                                        .encode("iso-8859-1") + b"\n")
    (folder / "text").mkdir(exist_ok=True)
    if plots is not None:
        rows = []
        for movie, (title, genres) in movies.items():
            plot = plots.get(movie, "N/A")
            rows.append("::".join([str(movie), title, "1995", "PG", "1 Jan 1995", genres, "Dir", "Wri", "Act",
                                   plot, "http://x/poster.jpg"]))
        (folder / "text" / "movies_extrainfos.dat.gz").write_bytes(gzip.compress("\r\n".join(rows).encode()))
    if abstracts is not None:
        (folder / "text" / "dbpedia_abstracts.json.gz").write_bytes(
            gzip.compress(json.dumps({str(k): v for k, v in abstracts.items()}).encode()))
    return folder


MOVIES = {1: ("Toy Story (1995)", "Animation|Children's|Comedy"),
          2: ("American President, The (1995)", "Comedy|Drama|Romance"),
          3: ("Heat (1995)", "Action|Crime|Thriller"),
          5: ("Sabrina (1995)", "Comedy|Romance")}
SEQUENCES = {1: [1, 2, 3, 5], 2: [2, 3, 1], 3: [5, 1, 2, 3]}


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory) -> str:
    """A tiny randomly initialised sentence-transformers model (BERT, 32-d) saved locally."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny_st")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,()'-:")
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(root / "hf")
    BertTokenizer(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "hf")
    model = SentenceTransformer(modules=[Transformer(str(root / "hf"), max_seq_length=64), Pooling(32, "mean")],
                                device="cpu")
    model.save(str(root / "st"))
    return str(root / "st")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return str(root)


def make_poster(path: Path, color: tuple[int, int, int], size=(60, 90)) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle([5, 5, 30, 40], fill=(255 - color[0], 255 - color[1], 255 - color[2]))
    image.save(path, "JPEG")


# --------------------------------------------------------------------------- texts

def test_text_priority_and_source_counts(tmp_path):
    folder = write_ml1m(tmp_path / "d", MOVIES, SEQUENCES,
                        plots={1: "Toys come to life.", 2: "A widowed president falls in love."},
                        abstracts={2: "Abstract that must lose to the plot.", 3: "Heat is a 1995 crime film."})
    texts = movie_texts(folder)
    assert texts.sources == {1: "plot", 2: "plot", 3: "abstract", 5: "title_genres"}
    assert texts.source_counts() == {"abstract": 1, "plot": 2, "title_genres": 1}
    assert texts.texts[1] == "Toy Story (1995). Genres: Animation, Children's, Comedy. Toys come to life."
    assert texts.texts[2].startswith("The American President (1995). Genres: Comedy, Drama, Romance. A widowed")
    assert "must lose" not in texts.texts[2]
    assert texts.texts[3].endswith("Heat is a 1995 crime film.")
    assert texts.texts[5] == "Sabrina (1995). Genres: Comedy, Romance."


def test_split_title_moves_articles_and_years():
    assert split_title("American President, The (1995)") == ("The American President", "1995")
    assert split_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == \
        ("The City of Lost Children (Cité des enfants perdus, La)", "1995")
    assert split_title("No Year") == ("No Year", None)


def test_bad_extrainfo_line_names_file_and_line(tmp_path):
    folder = write_ml1m(tmp_path / "d", MOVIES, SEQUENCES, plots={})
    path = folder / "text" / "movies_extrainfos.dat.gz"
    path.write_bytes(gzip.compress(b"1::Toy Story::1995::G\r\n"))
    with pytest.raises(DataError, match=r"movies_extrainfos\.dat\.gz:1: expected 11 fields"):
        movie_texts(folder)


# --------------------------------------------------------------------------- text extraction

def test_text_extraction_masks_norms_and_cache(tmp_path, tiny_st):
    folder = write_ml1m(tmp_path / "d", MOVIES, SEQUENCES, plots={1: "Toys come to life."})
    out = tmp_path / "features"
    data = load_dataset(folder)
    assert data.num_items == 6
    summary = run_extract(data, folder, out, text_encoder=tiny_st, modalities=("text",), progress=False)
    assert summary["text"]["status"] == "computed"
    raw = torch.load(out / "text_features.pt", weights_only=True)
    assert set(raw) == {"features", "mask", "meta"}
    table = load_table(out / "text_features.pt")
    assert table.features.shape == (6, 32) and table.dim == 32
    assert table.mask.tolist() == [False, True, True, True, False, True]
    assert torch.count_nonzero(table.features[[0, 4]]) == 0
    assert torch.allclose(table.features[table.mask].norm(dim=1), torch.ones(4), atol=1e-5)
    meta = table.meta
    assert meta["coverage"] == 4 and meta["dim"] == 32 and meta["missing"] == []
    assert meta["sources"] == {"plot": 1, "title_genres": 3}
    assert isinstance(meta["seconds"], float) and len(meta["input_hash"]) == 64

    # unchanged inputs: skipped, the file is not rewritten
    stamp = (out / "text_features.pt").stat().st_mtime_ns
    again = run_extract(data, folder, out, text_encoder=tiny_st, modalities=("text",), progress=False)
    assert again["text"]["status"] == "cached"
    assert (out / "text_features.pt").stat().st_mtime_ns == stamp

    # one changed plot: recomputed with a new hash
    write_ml1m(folder, MOVIES, SEQUENCES, plots={1: "Toys come to life at night."})
    changed = run_extract(data, folder, out, text_encoder=tiny_st, modalities=("text",), progress=False)
    assert changed["text"]["status"] == "computed"
    assert load_table(out / "text_features.pt").meta["input_hash"] != meta["input_hash"]


def test_text_zero_vector_rows_stay_masked(tmp_path, monkeypatch, tiny_st):
    from feddmmr.features import extract, text_encoder

    class Fake:
        def __init__(self, real):
            self.real = real
            self.dim = real.dim

        def encode(self, texts, batch_size=64, progress=True):
            out = self.real.encode(texts, batch_size, progress)
            out[0] = 0  # e.g. an encoder that returns nothing for an empty text
            return out

    real_load = text_encoder.load_text_encoder
    monkeypatch.setattr(extract, "load_text_encoder", lambda name, device: Fake(real_load(name, device)))
    texts = ItemTexts({1: "a", 2: "b"}, {1: "plot", 2: "plot"}, {1: 1, 2: 2})
    table, _ = extract_text(texts, 3, tmp_path / "t.pt", tiny_st, progress=False)
    assert table.mask.tolist() == [False, False, True]
    assert table.meta["missing"] == [1]


# --------------------------------------------------------------------------- visual extraction

def test_visual_corrupt_image_counts_as_missing(tmp_path, caplog):
    posters = tmp_path / "posters"
    posters.mkdir()
    make_poster(posters / "1.jpg", (200, 30, 30))
    make_poster(posters / "2.jpg", (30, 30, 200), size=(90, 60))
    (posters / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = (posters / "1.jpg").read_bytes()
    (posters / "4.jpg").write_bytes(good[: len(good) // 3])  # truncated
    known = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # 5 has no poster
    found = find_posters(posters, known)
    assert sorted(found) == [1, 2, 3, 4]
    table, status = extract_visual(found, known, 7, tmp_path / "v.pt", workers=0, progress=False)
    assert status == "computed"
    assert table.features.shape == (7, 1280)
    assert table.mask.tolist() == [False, True, True, False, False, False, False]
    assert torch.allclose(table.features[table.mask].norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.count_nonzero(table.features[~table.mask]) == 0
    meta = table.meta
    assert sorted(meta["unreadable"]) == [3, 4]
    assert sorted(meta["missing"]) == [3, 4, 5]
    assert meta["sources"] == {"poster": 2, "no_poster": 1, "unreadable": 2}
    assert meta["encoder"] == "efficientnet-lite0" and meta["dim"] == 1280 and meta["coverage"] == 2
    assert "unreadable poster" in caplog.text

    # cached while unchanged; a replaced poster triggers a recompute
    assert extract_visual(found, known, 7, tmp_path / "v.pt", progress=False)[1] == "cached"
    make_poster(posters / "3.jpg", (10, 200, 10))
    table2, status2 = extract_visual(found, known, 7, tmp_path / "v.pt", workers=1, progress=False)
    assert status2 == "computed" and bool(table2.mask[3])
    assert torch.allclose(table2.features[1], table.features[1], atol=1e-5)  # worker path == in-process path


def test_clip_path_with_tiny_random_clip(tmp_path, tiny_clip, tiny_st, capsys):
    folder = write_ml1m(tmp_path / "d", MOVIES, SEQUENCES)
    (folder / "posters").mkdir()
    make_poster(folder / "posters" / "1.jpg", (200, 30, 30))
    make_poster(folder / "posters" / "3.jpg", (30, 200, 30))
    out = tmp_path / "features"
    code = main(["features", "--data", str(folder), "--out", str(out), "--visual-encoder", "clip",
                 "--clip-path", tiny_clip, "--text-encoder", tiny_st, "--no-progress", "--workers", "0", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["visual"]["encoder"] == "clip" and summary["visual"]["dim"] == 16
    text, visual = load_features(out)
    assert visual.features.shape == (6, 16)
    assert visual.mask.tolist() == [False, True, False, True, False, False]
    assert visual.meta["missing"] == [2, 5] and visual.meta["clip_source"] == tiny_clip
    assert torch.allclose(visual.features[visual.mask].norm(dim=1), torch.ones(2), atol=1e-5)
    assert text.dim == 32 and text.coverage == 4
    # switching the encoder changes the identity in the hash: recomputed, not reused
    main(["features", "--data", str(folder), "--out", str(out), "--modality", "visual", "--no-progress",
          "--workers", "0", "--json"])
    assert json.loads(capsys.readouterr().out)["visual"]["status"] == "computed"
    assert load_features(out)[1].dim == 1280


def test_custom_table_with_item_text_and_posters(tmp_path, tiny_st):
    table_path = tmp_path / "inter.csv"
    rows = ["user,item,timestamp"] + [f"u{u},{item},{t}" for u in range(3)
                                      for t, item in enumerate(["m-b", "m-a", "m-c", "m-b"])]
    table_path.write_text("\n".join(rows) + "\n")
    (tmp_path / "items.tsv").write_text("item\ttext\nm-a\tA quiet film.\nm-c\tA loud film.\nm-z\tnot in data\n")
    posters = tmp_path / "imgs"
    posters.mkdir()
    make_poster(posters / "m-b.jpg", (100, 100, 0))
    data = load_dataset(table_path)
    assert list(data.item_raw_ids[1:]) == ["m-a", "m-b", "m-c"]
    out = tmp_path / "f"
    run_extract(data, table_path, out, text_encoder=tiny_st, posters=posters, item_text=tmp_path / "items.tsv",
                progress=False)
    text, visual = load_features(out, num_items=4)
    assert text.mask.tolist() == [False, True, False, True]
    assert text.meta["missing"] == ["m-b"] and text.meta["sources"] == {"item_text": 2}
    assert visual.mask.tolist() == [False, False, True, False]


# --------------------------------------------------------------------------- check

def clustered_tables(num_items: int, cluster_of: np.ndarray, dim: int, seed: int, missing=()) -> FeatureTable:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(cluster_of.max() + 1, dim))
    vectors = centres[cluster_of] + 0.3 * rng.normal(size=(num_items, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    features = torch.tensor(vectors, dtype=torch.float32)
    mask = torch.ones(num_items, dtype=torch.bool)
    mask[0] = False
    mask[list(missing)] = False
    features[~mask] = 0
    return FeatureTable(features, mask, {"encoder": "synthetic", "dim": dim, "coverage": int(mask.sum()),
                                         "input_hash": "x"})


def test_check_json_shape_and_consecutive_above_random(tmp_path, capsys):
    rng = np.random.default_rng(0)
    num_items = 41  # items 1..40, 4 clusters of 10
    cluster_of = np.concatenate([[0], np.repeat(np.arange(4), 10)])
    lines = ["UserID\tMovieID\tSeqPos"]
    for user in range(1, 61):  # every user stays inside one cluster
        cluster = user % 4
        items = rng.permutation(np.arange(1, 11) + 10 * cluster)[:8]
        lines += [f"{user}\t{item}\t{pos}" for pos, item in enumerate(items)]
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "interactions_all_users_ordered.tsv").write_text("\n".join(lines) + "\n")
    features = tmp_path / "f"
    save_table(clustered_tables(num_items, cluster_of, 8, 1), features / "text_features.pt")
    save_table(clustered_tables(num_items, cluster_of, 12, 2, missing=(3, 17)), features / "visual_features.pt")

    assert main(["features", "check", "--features", str(features), "--data", str(folder), "--top-users", "50",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"text", "visual"}
    for name, coverage in (("text", 40), ("visual", 38)):
        assert set(result[name]) == {"coverage", "consecutive", "random"}
        assert result[name]["coverage"] == coverage
        assert result[name]["consecutive"] > result[name]["random"] + 0.3

    # shuffled features carry no signal: consecutive is no longer above random
    data = load_dataset(folder)
    table = clustered_tables(num_items, cluster_of, 8, 1)
    table.features[1:] = table.features[1:][torch.randperm(num_items - 1, generator=torch.Generator().manual_seed(3))]
    shuffled = modality_check(table, data)
    assert shuffled["consecutive"] < shuffled["random"] + 0.15


def test_check_counts_only_pairs_with_both_features(tmp_path, monkeypatch):
    folder = write_ml1m(tmp_path / "d", MOVIES, {1: [1, 5, 2, 3, 1, 2], 2: [1, 2, 3, 3, 1]})
    data = load_dataset(folder)
    features = torch.zeros(6, 2)
    features[1] = torch.tensor([1.0, 0.0])
    features[2] = torch.tensor([1.0, 0.0])
    features[3] = torch.tensor([0.0, 1.0])
    mask = torch.tensor([False, True, True, True, False, False])
    table = FeatureTable(features, mask, {"encoder": "x", "dim": 2, "coverage": 3, "input_hash": "x"})
    # training parts [1, 5, 2, 3] and [1, 2, 3]; item 5 has no feature so (1,5) and (5,2) are dropped:
    # (2,3)=0, (1,2)=1, (2,3)=0 -> 1/3 (it would be 1/5 if the featureless pairs counted as 0)
    assert modality_check(table, data)["consecutive"] == pytest.approx(1 / 3, abs=1e-4)
    from feddmmr.features import check

    gram_result = modality_check(table, data, seed=5)
    monkeypatch.setattr(check, "GRAM_MAX_ITEMS", 0)  # the chunked path for large catalogues agrees
    assert modality_check(table, data, seed=5) == gram_result


# --------------------------------------------------------------------------- loader errors

def good_table(rows=4, dim=3) -> FeatureTable:
    features = torch.zeros(rows, dim)
    features[1:, 0] = 1.0
    mask = torch.tensor([False] + [True] * (rows - 1))
    return FeatureTable(features, mask, {"encoder": "x", "dim": dim, "coverage": rows - 1, "input_hash": "h"})


def test_load_features_clear_errors(tmp_path):
    with pytest.raises(FeatureError, match="feature folder not found"):
        load_features(tmp_path / "nope")
    save_table(good_table(), tmp_path / "text_features.pt")
    with pytest.raises(FeatureError, match=r"visual_features\.pt: feature file not found"):
        load_features(tmp_path)
    (tmp_path / "visual_features.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(FeatureError, match=r"visual_features\.pt: not a readable feature file"):
        load_features(tmp_path)
    torch.save(torch.zeros(4, 3), tmp_path / "visual_features.pt")
    with pytest.raises(FeatureError, match=r"visual_features\.pt: malformed feature file: expected a dict"):
        load_features(tmp_path)
    bad = good_table().to_dict()
    bad["mask"] = bad["mask"][:3]
    torch.save(bad, tmp_path / "visual_features.pt")
    with pytest.raises(FeatureError, match=r"visual_features\.pt: malformed .*'mask' must be a bool tensor"):
        load_features(tmp_path)
    bad = good_table().to_dict()
    bad["features"][2, 1] = 5.0
    torch.save(bad, tmp_path / "visual_features.pt")
    with pytest.raises(FeatureError, match="L2-normalised"):
        load_features(tmp_path)
    bad = good_table().to_dict()
    bad["meta"]["dim"] = 384
    torch.save(bad, tmp_path / "visual_features.pt")
    with pytest.raises(FeatureError, match=r"meta\['dim'\] = 384 but features have 3 columns"):
        load_features(tmp_path)
    save_table(good_table(rows=5), tmp_path / "visual_features.pt")
    with pytest.raises(FeatureError, match="different datasets"):
        load_features(tmp_path)
    save_table(good_table(), tmp_path / "visual_features.pt")
    text, visual = load_features(tmp_path)
    assert (text.dim, visual.num_items) == (3, 4)
    with pytest.raises(FeatureError, match="has 4 rows but the dataset has 3953"):
        load_features(tmp_path, num_items=3953)


def test_cli_check_reports_missing_features_cleanly(tmp_path, capsys):
    folder = write_ml1m(tmp_path / "d", MOVIES, SEQUENCES)
    code = main(["features", "check", "--features", str(tmp_path / "none"), "--data", str(folder), "--json"])
    assert code == 2
    assert "feature folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- integration

@pytest.mark.integration
@pytest.mark.skipif(not ML1M.is_dir(), reason="../shared/data/ml-1m not present")
def test_real_encoders_on_a_few_ml1m_items(tmp_path):
    items = [1, 3114, 2, 1974, 2710]  # Toy Story, Toy Story 2, Jumanji, Friday the 13th, Blair Witch
    every = movie_texts(ML1M.resolve())
    texts = ItemTexts({i: every.texts[i] for i in items}, {i: every.sources[i] for i in items},
                      {i: i for i in items})
    text, _ = extract_text(texts, 3953, tmp_path / "text_features.pt", progress=False)
    assert text.features.shape == (3953, 384) and text.coverage == len(items)
    assert text.meta["encoder"] == "all-MiniLM-L6-v2"
    f = text.features
    assert float(f[1] @ f[3114]) > float(f[1] @ f[1974]) + 0.1  # the sequel is closer than a slasher

    posters = find_posters(ML1M.resolve() / "posters", {i: i for i in items})
    visual, _ = extract_visual(posters, {i: i for i in items}, 3953, tmp_path / "visual_features.pt",
                               workers=0, progress=False)
    assert visual.features.shape == (3953, 1280)
    assert visual.coverage == len(posters) >= 3
    assert torch.allclose(visual.features[visual.mask].norm(dim=1), torch.ones(visual.coverage), atol=1e-5)
    text2, visual2 = load_features(tmp_path, num_items=3953)
    assert text2.coverage == text.coverage and visual2.dim == 1280
