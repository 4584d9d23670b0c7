"""Keyword extraction on hand-checked examples."""
import pytest

from megaclass.weighting.keywords import ENGLISH_STOP_WORDS, KeywordExtractor


@pytest.fixture(scope="module")
def extract():
    return KeywordExtractor()


@pytest.mark.parametrize("texts, expected", [
    # HTML entities and tags, a URL, a camera file name with digits, stop words, plural nouns.
    (("Cranes &amp; Herons at the <b>lake</b>", "see http://www.example.com/a/b.jpg DSC_0123.JPG 2016",
      "wading birds"), ["crane", "heron", "lake", "see", "wading", "bird"]),
    # Numeric entity (&#39;), possessive, irregular plural lemmatized by WordNet.
    (("children&#39;s toys", "", "geese"), ["child", "toy", "goose"]),
    # File suffixes go but the stem stays; duplicates keep their first position.
    (("crane.png crane-photo", "Crane!", None), ["crane"]),
    # Digits inside words split them; one-letter leftovers go; web boilerplate goes.
    (("IMG_2041 wallpaper HD free download", "", "b52 bomber"), ["bomber"]),
    (("", None, ""), []),
])
def test_hand_checked_examples(extract, texts, expected):
    assert extract(*texts) == expected


def test_non_ascii_letters_survive_and_stop_list_is_nltks(extract):
    assert extract("Grüner Kranich") == ["grüner", "kranich"]
    assert len(ENGLISH_STOP_WORDS) == 179  # NLTK 3.x english list
    assert {"the", "ourselves", "wouldn't", "ma"} <= ENGLISH_STOP_WORDS


@pytest.mark.parametrize("text", [
    "Cranes &amp; Herons at the <b>LAKE</b>, see HTTP://WWW.Example.COM/a/b.JPG and www.Birds.org/x.png",
    "photo.JPEG crane.Html ftp://host/file.php?x=1 IMG_2041.Jpg index.aspx go.jsp tiff.TIFF heron.webp.",
    "end with a url https://a.b/c", "no url www but dots... and x.y",
])
def test_ascii_path_matches_the_unicode_path(extract, text):
    # ASCII text takes a faster path (lower-cased first, [a-z] tokens); appending a one-letter non-ASCII
    # word (too short to be a keyword) sends the same text down the general Unicode path
    assert extract(text) == extract(text + " é")
