"""Synsets files, timm's lists, class text and the WebVision-2.0-style selection."""
from pathlib import Path

import pytest

from megaclass.semantics import (
    SynsetsError,
    class_texts,
    imagenet1k_wnids,
    imagenet22k_wnids,
    read_synsets,
    select_webvision2,
    synset_of,
    timm_info_dir,
    wnid_of,
    write_synsets,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "synsets.txt"
    path.write_text(text)
    return path


def test_reads_webvision_and_bare_formats_skipping_blank_lines(tmp_path):
    path = write(tmp_path, "n01440764 tench, Tinca tinca\n\n   \nn01443537\tgoldfish, Carassius auratus\r\n"
                           "n02123045\n")
    assert read_synsets(path) == [("n01440764", "tench, Tinca tinca"),
                                  ("n01443537", "goldfish, Carassius auratus"), ("n02123045", "")]


def test_duplicate_and_malformed_ids_are_one_error_with_lines(tmp_path):
    path = write(tmp_path, "n01440764 tench\nn01443537\n\nn01440764 again\nfoo bar\nn0144\nn01443537\n")
    with pytest.raises(SynsetsError) as info:
        read_synsets(path, check_wordnet=False)
    message = str(info.value)
    assert f"{path}:4: duplicate wnid n01440764 (first on line 1)" in message
    assert f"{path}:7: duplicate wnid n01443537 (first on line 2)" in message
    assert f"{path}:5: 'foo' is not a wnid" in message and f"{path}:6: 'n0144' is not a wnid" in message


def test_unknown_ids_are_listed_all_in_one_error(tmp_path):
    # n00000001: no synset at that offset; v01926329 is a verb (WordNet has it, the noun hierarchy not).
    path = write(tmp_path, "n02123045 tabby\nn00000001\nn02123159\nn99999999 nothing\nv01926329\n")
    with pytest.raises(SynsetsError) as info:
        read_synsets(path)
    message = str(info.value)
    assert message.startswith("3 wnid(s) are not WordNet 3.0 noun synsets")
    for line, wnid in ((2, "n00000001"), (4, "n99999999"), (5, "v01926329")):
        assert f"{path}:{line}: {wnid}" in message
    assert "n02123045" not in message and "n02123159" not in message


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(SynsetsError, match="lists no synsets"):
        read_synsets(write(tmp_path, "\n\n"))
    with pytest.raises(SynsetsError, match="cannot read synsets file"):
        read_synsets(tmp_path / "absent.txt")


def test_timm_lists_are_found_through_the_package():
    assert timm_info_dir().joinpath("imagenet_synsets.txt").is_file()
    one_k, all_22k = imagenet1k_wnids(), imagenet22k_wnids()
    assert (len(one_k), len(all_22k)) == (1000, 21841)
    assert one_k[0] == "n01440764"
    assert set(one_k) - set(all_22k) == {"n04399382"}  # teddy bear: ILSVRC's id, absent from fall-2011 22k


def test_class_text_has_lemmas_gloss_and_hypernyms():
    # Reference strings from timm's own lemma/definition lists, read independently of WordNet.
    info = timm_info_dir()
    lemma = dict(l.split("\t", 1) for l in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    gloss = dict(l.split("\t", 1) for l in (info / "imagenet_synset_to_definition.txt").read_text().splitlines())
    tabby, crane = class_texts(["n02123045", "n03126707"])
    assert tabby == f"{lemma['n02123045']}: {gloss['n02123045']}; a kind of {lemma['n02121808']}"
    assert crane == f"{lemma['n03126707']}: {gloss['n03126707']}; a kind of {lemma['n03664675']}"
    assert class_texts(["n01440764"], names=["tinca"])[0].startswith("tinca: freshwater dace-like game fish")
    # Two hypernyms, listed by synset name (NLTK's own order changes from process to process).
    assert class_texts(["n04486054"])[0].endswith("; a kind of arch; memorial, monument")


def test_webvision2_selection(tmp_path):
    chosen = select_webvision2()
    assert len(chosen) == len(set(chosen)) == 5000
    assert chosen[:1000] == imagenet1k_wnids() and set(chosen[1000:]) <= set(imagenet22k_wnids())
    chosen_set = set(chosen)
    for wnid in chosen:  # no chosen class has a chosen hypernym (so none is another's descendant)
        synset = synset_of(wnid)
        assert not {wnid_of(a) for a in synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms())} & chosen_set
    assert select_webvision2() == chosen
    assert select_webvision2(seed=1)[1000:] != chosen[1000:]
    path = tmp_path / "webvision2.txt"
    write_synsets(path, chosen)
    entries = read_synsets(path)
    assert [w for w, _ in entries] == chosen and entries[0] == ("n01440764", "tench, Tinca tinca")


def test_a_bom_tabs_and_bad_bytes_are_handled_by_the_reader_the_data_set_uses(tmp_path):
    """The data set reads synsets.txt with the same reader: a BOM (also one left where files were
    joined) and tabs are read as `megaclass semantics` reads them; bad lines name file and line."""
    from megaclass.data.webvision import WebVisionFormatError, _read_class_list

    path = tmp_path / "synsets.txt"
    path.write_bytes("\ufeffn01440764\ttench, Tinca tinca\n\ufeffn01443537 goldfish\n".encode())
    assert read_synsets(path, check_wordnet=False) == _read_class_list(path) == [
        ("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish")]
    path.write_bytes(b"n01440764 tench\nn01443537 gold\xfffish\nn01440764\tagain\ncat\n")
    with pytest.raises(WebVisionFormatError) as info:
        _read_class_list(path)
    message = str(info.value)
    assert f"{path}:2: not UTF-8" in message
    assert f"{path}:3: duplicate wnid n01440764 (first on line 1)" in message
    assert f"{path}:4: 'cat' is not a wnid" in message
