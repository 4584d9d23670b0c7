"""WordNet 3.0 without a download: Debian's files arranged for NLTK, and the error when there is none."""
import pytest
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from megaclass.semantics import synset_of, wnid_of
import megaclass.semantics.wordnet as wn_module


@pytest.mark.filterwarnings("ignore:The multilingual functions are not available")
def test_debian_files_become_an_nltk_corpus(tmp_path, monkeypatch):
    import nltk

    if not (wn_module.DEBIAN_WORDNET / "data.noun").is_file():
        pytest.skip("Debian's wordnet-base is not installed here")
    root = wn_module._install_from_debian(wn_module.DEBIAN_WORDNET, tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(root)] + nltk.data.path)  # NLTK reads only under its roots
    reader = WordNetCorpusReader(str(root / "corpora" / "wordnet"), None)  # NLTK's own reader, fresh
    assert reader.get_version() == "3.0"
    assert reader.synset_from_pos_and_offset("n", 1440764).name() == "tench.n.01"
    assert reader.synset("crane.n.05").lexname() == "noun.animal"  # needs the written lexnames file


def test_no_wordnet_anywhere_names_both_ways(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(wn_module, "DEBIAN_WORDNET", tmp_path / "debian")
    monkeypatch.setenv("MEGACLASS_NLTK_DATA", str(tmp_path / "managed"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    with pytest.raises(wn_module.WordNetNotFound) as info:
        wn_module.ensure_wordnet()
    assert "NLTK_DATA" in str(info.value) and "apt-get install wordnet-base wordnet-sense-index" in str(info.value)


def test_wnid_round_trip():
    tench = synset_of("n01440764")
    assert tench.name() == "tench.n.01" and wnid_of(tench) == "n01440764"
    for bad in ("n00000001", "x01440764", "n0144076", ""):
        with pytest.raises(KeyError):
            synset_of(bad)
